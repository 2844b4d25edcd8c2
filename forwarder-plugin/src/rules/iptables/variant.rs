//! iptables comes in two kernel back-ends, `legacy` (xtables) and `nft`
//! (nf_tables through the iptables-nft compatibility layer). Rules written
//! with one are invisible to the other, yet both stay active
//! (istio#52357, linkerd2#8732), so we pick the one the namespace already
//! uses and clean up in both.

use std::path::PathBuf;
use std::str::FromStr;

use crate::rules::exec::find_tool;
use crate::rules::plan::Family;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    Legacy,
    Nft,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Legacy => "legacy",
            Variant::Nft => "nft",
        }
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "legacy" => Ok(Variant::Legacy),
            "nft" => Ok(Variant::Nft),
            _ => Err(format!("unknown iptables variant {s:?} (legacy or nft)")),
        }
    }
}

/// The restore/save pair of one variant and family.
#[derive(Debug, Clone)]
pub(crate) struct Tools {
    pub variant: Variant,
    pub family: Family,
    pub restore: PathBuf,
    pub save: PathBuf,
}

impl Tools {
    pub fn label(&self) -> String {
        format!(
            "{}-{}",
            match self.family {
                Family::V4 => "iptables",
                Family::V6 => "ip6tables",
            },
            self.variant
        )
    }
}

/// `iptables-nft-restore` etc.; failing that, a plain `iptables-restore`
/// that is a link to the variant's multi-call binary.
pub(crate) fn tools(variant: Variant, family: Family) -> Option<Tools> {
    let base = match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    };
    let v = variant.name();
    let found = |restore: String, save: String| {
        Some(Tools {
            variant,
            family,
            restore: find_tool(&restore)?,
            save: find_tool(&save)?,
        })
    };
    found(format!("{base}-{v}-restore"), format!("{base}-{v}-save")).or_else(|| {
        let restore = find_tool(&format!("{base}-restore"))?;
        let target = std::fs::canonicalize(&restore).ok()?;
        let multi = target.file_name()?.to_string_lossy().into_owned();
        // xtables-nft-multi / xtables-legacy-multi
        if !multi.contains(&format!("-{v}-")) {
            return None;
        }
        found(format!("{base}-restore"), format!("{base}-save"))
    })
}
