use std::fmt;
use std::str::FromStr;

/// An Ethernet address, written `02:fe:00:00:00:01` (serialized the same way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A unicast, non-zero address: what may be set on a link.
    pub fn is_assignable(&self) -> bool {
        self.0[0] & 0x01 == 0 && self.0 != [0; 6]
    }

    pub(crate) fn from_bytes(b: &[u8]) -> Option<MacAddr> {
        b.try_into().ok().map(MacAddr)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid MAC address {0:?}: expected six hex bytes like 02:fe:00:00:00:01")]
pub struct BadMac(String);

impl FromStr for MacAddr {
    type Err = BadMac;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts.next().ok_or_else(|| BadMac(s.to_owned()))?;
            if p.len() != 2 {
                return Err(BadMac(s.to_owned()));
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| BadMac(s.to_owned()))?;
        }
        if parts.next().is_some() {
            return Err(BadMac(s.to_owned()));
        }
        Ok(MacAddr(out))
    }
}

impl serde::Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let m: MacAddr = "02:FE:00:0a:0b:0c".parse().unwrap();
        assert_eq!(m.0, [2, 0xfe, 0, 10, 11, 12]);
        assert_eq!(m.to_string(), "02:fe:00:0a:0b:0c");
        assert!(m.is_assignable());
        for bad in [
            "",
            "02:fe:00:0a:0b",
            "02:fe:00:0a:0b:0c:0d",
            "2:fe:00:0a:0b:0c",
            "zz:fe:00:0a:0b:0c",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert!(
            !"01:00:5e:00:00:01"
                .parse::<MacAddr>()
                .unwrap()
                .is_assignable()
        );
        assert!(
            !"00:00:00:00:00:00"
                .parse::<MacAddr>()
                .unwrap()
                .is_assignable()
        );
    }
}
