//! Desired state as operators write it: assignments of resources to a device or to a label
//! selector, and the per-device documents that follow from them. Pure logic, shared by
//! every store backend.
//!
//! A device's effective document is built from every assignment whose target matches it:
//! selector assignments first, in the order they were made, then the device's own
//! assignments, later ones replacing earlier ones of the same resource name.

use std::collections::BTreeMap;
use std::fmt;

use cairn_sync_protocol::message::Labels;
use cairn_sync_protocol::state::Resource;
use cairn_sync_protocol::{DeviceId, LabelKey, LabelValue, ResourceName};
use serde::{Deserialize, Serialize};

/// One term of a selector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Term {
    Equals(LabelKey, LabelValue),
    NotEquals(LabelKey, LabelValue),
    Exists(LabelKey),
}

/// A label selector such as `site=paris,role!=kiosk,canary`: all terms must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector(pub Vec<Term>);

#[derive(Debug, thiserror::Error)]
#[error("selector {input:?}: {reason}")]
pub struct SelectorError {
    input: String,
    reason: String,
}

impl std::str::FromStr for Selector {
    type Err = SelectorError;

    fn from_str(input: &str) -> Result<Self, SelectorError> {
        let err = |reason: String| SelectorError {
            input: input.to_string(),
            reason,
        };
        let mut terms = Vec::new();
        for part in input.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let term = if let Some((k, v)) = part.split_once("!=") {
                Term::NotEquals(
                    LabelKey::new(k.trim()).map_err(|e| err(e.to_string()))?,
                    LabelValue::new(v.trim()).map_err(|e| err(e.to_string()))?,
                )
            } else if let Some((k, v)) = part.split_once('=') {
                Term::Equals(
                    LabelKey::new(k.trim()).map_err(|e| err(e.to_string()))?,
                    LabelValue::new(v.trim()).map_err(|e| err(e.to_string()))?,
                )
            } else {
                Term::Exists(LabelKey::new(part).map_err(|e| err(e.to_string()))?)
            };
            terms.push(term);
        }
        if terms.is_empty() {
            return Err(err(
                "is empty; write key=value terms separated by commas, e.g. site=paris,role=kiosk"
                    .into(),
            ));
        }
        Ok(Self(terms))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match t {
                Term::Equals(k, v) => write!(f, "{k}={v}")?,
                Term::NotEquals(k, v) => write!(f, "{k}!={v}")?,
                Term::Exists(k) => write!(f, "{k}")?,
            }
        }
        Ok(())
    }
}

impl Selector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.0.iter().all(|t| match t {
            Term::Equals(k, v) => labels.get(k) == Some(v),
            Term::NotEquals(k, v) => labels.get(k) != Some(v),
            Term::Exists(k) => labels.contains_key(k),
        })
    }
}

/// What an assignment applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Device(DeviceId),
    Selector(Selector),
}

impl Target {
    pub fn matches(&self, device: &DeviceId, labels: &Labels) -> bool {
        match self {
            Target::Device(d) => d == device,
            Target::Selector(s) => s.matches(labels),
        }
    }

    /// A stable textual form, used as a key by stores.
    pub fn kind_and_key(&self) -> (&'static str, String) {
        match self {
            Target::Device(d) => ("device", d.to_string()),
            Target::Selector(s) => ("selector", s.to_string()),
        }
    }

    pub fn from_kind_and_key(kind: &str, key: &str) -> Option<Self> {
        match kind {
            "device" => DeviceId::new(key).ok().map(Target::Device),
            "selector" => key.parse().ok().map(Target::Selector),
            _ => None,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Device(d) => write!(f, "device {d}"),
            Target::Selector(s) => write!(f, "selector {s}"),
        }
    }
}

/// One stored assignment.
#[derive(Debug, Clone)]
pub struct Assignment {
    /// Creation order; later assignments win.
    pub order: i64,
    pub target: Target,
    pub name: ResourceName,
    pub resource: Resource,
}

/// The effective resources of a device under `assignments` (any order).
pub fn effective(
    device: &DeviceId,
    labels: &Labels,
    assignments: &[Assignment],
) -> BTreeMap<ResourceName, Resource> {
    let mut matching: Vec<&Assignment> = assignments
        .iter()
        .filter(|a| a.target.matches(device, labels))
        .collect();
    matching.sort_by_key(|a| (matches!(a.target, Target::Device(_)), a.order));
    matching
        .into_iter()
        .map(|a| (a.name.clone(), a.resource.clone()))
        .collect()
}

/// Parses `k=v,k2=v2` into labels.
pub fn parse_labels(s: &str) -> Result<Labels, String> {
    let mut labels = Labels::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("label {part:?} is not key=value"))?;
        labels.insert(
            LabelKey::new(k.trim()).map_err(|e| e.to_string())?,
            LabelValue::new(v.trim()).map_err(|e| e.to_string())?,
        );
    }
    if labels.len() > cairn_sync_protocol::message::MAX_LABELS {
        return Err(format!(
            "{} labels, the limit is {}",
            labels.len(),
            cairn_sync_protocol::message::MAX_LABELS
        ));
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_sync_protocol::Text;
    use cairn_sync_protocol::state::FileResource;

    fn file(c: &str) -> Resource {
        Resource::File(FileResource {
            path: Text::new("p").unwrap(),
            content: c.into(),
            mode: 0o644,
            uid: None,
            gid: None,
        })
    }

    #[test]
    fn selectors_parse_print_and_match() {
        let s: Selector = "site=paris, role!=kiosk,canary".parse().unwrap();
        assert_eq!(s.to_string(), "site=paris,role!=kiosk,canary");
        let l = parse_labels("site=paris,canary=yes").unwrap();
        assert!(s.matches(&l));
        let l = parse_labels("site=paris,role=kiosk,canary=yes").unwrap();
        assert!(!s.matches(&l));
        assert!("".parse::<Selector>().is_err());
        assert!("a=b c".parse::<Selector>().is_err());
    }

    #[test]
    fn device_assignments_beat_selectors_and_later_beats_earlier() {
        let d = DeviceId::new("dev-1").unwrap();
        let labels = parse_labels("site=paris").unwrap();
        let n = ResourceName::new("motd").unwrap();
        let a = |order, target, c: &str| Assignment {
            order,
            target,
            name: n.clone(),
            resource: file(c),
        };
        let sel = |s: &str| Target::Selector(s.parse().unwrap());
        let all = vec![
            a(3, Target::Device(d.clone()), "device"),
            a(1, sel("site=paris"), "paris-old"),
            a(5, sel("site=paris"), "paris-new"),
            a(6, sel("site=rome"), "rome"),
        ];
        assert_eq!(effective(&d, &labels, &all)[&n], file("device"));
        assert_eq!(effective(&d, &labels, &all[1..])[&n], file("paris-new"));
        assert!(effective(&d, &labels, &all[3..]).is_empty());
    }
}
