//! Go-style durations (`time.ParseDuration`): `10m`, `1h30m`, `500ms`, `1.5s`,
//! `0`. NSM configures every duration this way (envconfig), so ours must too.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("{0:?} is not a duration: expected e.g. 10m, 1h30m, 500ms")]
    Syntax(String),
    #[error("{0:?} has unknown unit {1:?}: use ns, us, ms, s, m or h")]
    Unit(String, String),
    #[error("{0:?} is negative")]
    Negative(String),
    #[error("{0:?} is too large")]
    Overflow(String),
}

const NANOS: [(&str, u128); 9] = [
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000), // U+00B5
    ("μs", 1_000), // U+03BC
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60 * 1_000_000_000),
    ("h", 3_600 * 1_000_000_000),
    ("", 0),
];

/// Parses a non-negative Go duration.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let syntax = || DurationError::Syntax(text.to_owned());
    let mut s = text;
    if let Some(rest) = s.strip_prefix('+') {
        s = rest;
    } else if s.starts_with('-') {
        // Go accepts "-0"; nothing we configure can be negative anyway.
        return Err(DurationError::Negative(text.to_owned()));
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(syntax());
    }
    let mut total: u128 = 0;
    while !s.is_empty() {
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let (int, rest) = s.split_at(int_len);
        let (frac, rest) = match rest.strip_prefix('.') {
            Some(r) => {
                let n = r.bytes().take_while(u8::is_ascii_digit).count();
                r.split_at(n)
            }
            None => ("", rest),
        };
        if int.is_empty() && frac.is_empty() {
            return Err(syntax());
        }
        let unit_len = rest
            .char_indices()
            .find(|&(_, c)| c.is_ascii_digit() || c == '.')
            .map_or(rest.len(), |(i, _)| i);
        let (unit, rest) = rest.split_at(unit_len);
        if unit.is_empty() {
            return Err(DurationError::Syntax(format!("{text} (missing unit)")));
        }
        let per = NANOS
            .iter()
            .find(|(u, _)| *u == unit && !u.is_empty())
            .map(|&(_, n)| n)
            .ok_or_else(|| DurationError::Unit(text.to_owned(), unit.to_owned()))?;
        let overflow = || DurationError::Overflow(text.to_owned());
        let whole: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| overflow())?
        };
        let mut part = whole.checked_mul(per).ok_or_else(overflow)?;
        // Fraction digits beyond nanosecond precision cannot matter.
        let frac = &frac[..frac.len().min(18)];
        if !frac.is_empty() {
            let f: u128 = frac.parse().map_err(|_| syntax())?;
            part += f * per / 10u128.pow(frac.len() as u32);
        }
        total = total.checked_add(part).ok_or_else(overflow)?;
        s = rest;
    }
    let nanos = u64::try_from(total).map_err(|_| DurationError::Overflow(text.to_owned()))?;
    Ok(Duration::from_nanos(nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_examples() {
        let ok = [
            ("0", Duration::ZERO),
            ("10m", Duration::from_secs(600)),
            ("1h30m", Duration::from_secs(5400)),
            ("500ms", Duration::from_millis(500)),
            ("1.5s", Duration::from_millis(1500)),
            (".5s", Duration::from_millis(500)),
            (
                "2h45m10.25s",
                Duration::from_millis((2 * 3600 + 45 * 60 + 10) * 1000 + 250),
            ),
            ("+3s", Duration::from_secs(3)),
            ("100us", Duration::from_micros(100)),
            ("100µs", Duration::from_micros(100)),
            ("7ns", Duration::from_nanos(7)),
            ("240s", Duration::from_secs(240)),
        ];
        for (text, want) in ok {
            assert_eq!(parse(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_what_go_rejects() {
        for bad in ["", "10", "m", "s10", "1 m", "1m 2s", "."] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(matches!(parse("10d"), Err(DurationError::Unit(_, u)) if u == "d"));
        assert!(matches!(parse("-1s"), Err(DurationError::Negative(_))));
        assert!(matches!(
            parse("999999999999h"),
            Err(DurationError::Overflow(_))
        ));
    }
}
