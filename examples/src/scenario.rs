//! The scenario language both fleet-simulation modes run: a fleet (size, labels, link
//! quality), a timeline of operator actions and faults, and the invariants to check at
//! the end. Scenarios are small TOML files in `examples/scenarios/`; see `default.toml`
//! there for every kind of step.
//!
//! The real mode ([`crate::real`]) runs a timeline against a real hub and real agents in
//! wall-clock time; the deterministic mode ([`crate::det`]) runs the same timeline
//! against the sans-IO protocol cores in virtual time. Which devices a fault hits is
//! drawn from the scenario's seed, so both modes pick the same devices.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cairn_hub::desired::{Selector, parse_labels};
use cairn_sync_protocol::message::Labels;
use cairn_sync_protocol::{ResourceName, Text};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Deserializer, Serialize};

/// The scenario the README's command runs when no file is given.
pub const DEFAULT: &str = include_str!("../scenarios/default.toml");

/// A whole scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Fleet size; `--devices` overrides it.
    pub devices: usize,
    /// Seed for every random choice (which devices a fault hits, jitter, loss);
    /// `--seed` overrides it.
    #[serde(default)]
    pub seed: u64,
    /// Labels given to device `i`: for each entry, `values[i % values.len()]`.
    #[serde(default)]
    pub labels: Vec<LabelSpec>,
    #[serde(default)]
    pub network: Network,
    pub steps: Vec<Step>,
    /// Boxes get file-backed A/B slots flashed with OS 1.0.0 (real mode only).
    #[serde(default)]
    pub upgrades: Option<UpgradeSim>,
    /// Boxes attest with the software TPM: every session starts with a challenge, and
    /// the hub verifies the quote and event log before desired state flows. `false`
    /// enrolls them unattested (scale runs, where quoting and verifying would dominate),
    /// and `all-attested` is then not checked.
    #[serde(default = "yes")]
    pub attest: bool,
    /// A hub attestation policy set before the boxes enroll, as `cairn-hub policy set`
    /// would (e.g. `tofu = true`: the first verified measurements are accepted, later
    /// ones must match them, so a `tamper`ed boot is quarantined).
    #[serde(default, rename = "attest-policy")]
    pub attest_policy: Option<cairn_hub::attest::AttestPolicy>,
    /// Invariants checked at the end; all of them when left out.
    #[serde(default = "Invariant::all")]
    pub check: Vec<Invariant>,
}

/// A/B slots of the simulated boxes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeSim {
    /// Size of the OS image (1.0.0, flashed into slot A) and of every release, KiB.
    #[serde(default = "default_image_kib")]
    pub image_kib: u64,
}

fn yes() -> bool {
    true
}

fn default_image_kib() -> u64 {
    256
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelSpec {
    pub key: String,
    pub values: Vec<String>,
}

/// Quality of every device's link to the hub, unless a step says otherwise.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// One-way delay added to each packet.
    #[serde(default, with = "humantime_serde_compat")]
    pub latency: Duration,
    /// Uniformly distributed extra delay, up to this much.
    #[serde(default, with = "humantime_serde_compat")]
    pub jitter: Duration,
    /// Probability that a packet is dropped (0.0 to 1.0).
    #[serde(default)]
    pub loss: f64,
}

impl Default for Network {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
        }
    }
}

/// One entry of the timeline. Steps run in order; a step with a duration (`for`) starts
/// its fault and the timeline moves on at once, the fault ends by itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "do", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Step {
    /// The operator sets a file resource for every device matching `selector`.
    Set {
        selector: SelectorText,
        resource: ResourceName,
        path: Text<1024>,
        content: String,
    },
    /// The operator removes a resource assignment made for `selector`.
    Unset {
        selector: SelectorText,
        resource: ResourceName,
    },
    /// Waits until every device that is not cut off has applied its newest desired
    /// revision, and records a phase: how long each device took, counted from the
    /// previous operator action (or fault that ended) before this step.
    Converge {
        name: String,
        #[serde(default = "default_converge_timeout", with = "humantime_serde_compat")]
        timeout: Duration,
    },
    /// Cuts the links of `devices` (every packet dropped). With `for`, they heal by
    /// themselves; without it, at the next `heal`.
    Partition {
        devices: Share,
        #[serde(default)]
        selector: Option<SelectorText>,
        #[serde(rename = "for", default, with = "humantime_serde_compat::option")]
        duration: Option<Duration>,
    },
    /// Heals every partition.
    Heal,
    /// Links of `devices` go down and up every `period` (down half of it) for `for`.
    Flap {
        devices: Share,
        #[serde(default)]
        selector: Option<SelectorText>,
        #[serde(with = "humantime_serde_compat")]
        period: Duration,
        #[serde(rename = "for", with = "humantime_serde_compat")]
        duration: Duration,
    },
    /// The hub process is killed (SIGKILL in real mode) and started again after `down`.
    HubRestart {
        #[serde(default, with = "humantime_serde_compat")]
        down: Duration,
    },
    /// Agents are killed at once and started again after `down`.
    Crash {
        devices: Share,
        #[serde(default)]
        selector: Option<SelectorText>,
        #[serde(default, with = "humantime_serde_compat")]
        down: Duration,
    },
    /// Someone changes a managed file on `devices` by hand: each agent restores it and
    /// reports `drift-corrected` (an event that must reach the hub exactly once).
    Drift {
        devices: Share,
        #[serde(default)]
        selector: Option<SelectorText>,
        resource: ResourceName,
    },
    /// `devices` reboot into a boot image they were not enrolled with (their software
    /// TPM measures another one): the hub quarantines them at their next evidence, and
    /// they get no desired state until the operator accepts (`accept`).
    Tamper {
        devices: Share,
        #[serde(default)]
        selector: Option<SelectorText>,
    },
    /// The operator accepts the current measurements of every quarantined device (that
    /// matches `selector`), as `cairn-hub device accept` does.
    Accept {
        #[serde(default)]
        selector: Option<SelectorText>,
    },
    /// Lets time pass.
    Sleep {
        #[serde(rename = "for", with = "humantime_serde_compat")]
        duration: Duration,
    },
    /// The operator builds and pushes OS release `version`: the previous release's image
    /// with `changed` of its 4 KiB blocks rewritten. `broken`: its kernel panics.
    Release {
        version: String,
        #[serde(default = "default_changed")]
        changed: f64,
        #[serde(default)]
        broken: bool,
    },
    /// The operator makes `version` the desired OS of `selector`; `health_cmd` must
    /// pass on the trial boot.
    OsSet {
        selector: SelectorText,
        version: String,
        #[serde(default, rename = "health-cmd")]
        health_cmd: Option<String>,
        #[serde(
            default = "default_health_timeout",
            rename = "health-timeout",
            with = "humantime_serde_compat"
        )]
        health_timeout: Duration,
    },
    /// Waits until every device that is not cut off has finished its upgrade
    /// (committed, rolled back or refused) and records a phase.
    ConvergeOs {
        name: String,
        #[serde(default = "default_converge_timeout", with = "humantime_serde_compat")]
        timeout: Duration,
    },
}

fn default_converge_timeout() -> Duration {
    Duration::from_secs(120)
}

fn default_changed() -> f64 {
    0.1
}

fn default_health_timeout() -> Duration {
    Duration::from_secs(60)
}

impl Step {
    /// A one-line description for progress output and reports.
    pub fn describe(&self) -> String {
        match self {
            Step::Set {
                selector, resource, ..
            } => format!("set {resource} for {selector}"),
            Step::Unset { selector, resource } => format!("unset {resource} for {selector}"),
            Step::Converge { name, .. } => format!("converge ({name})"),
            Step::Partition {
                devices, duration, ..
            } => match duration {
                Some(d) => format!("partition {devices} for {}", humantime::format_duration(*d)),
                None => format!("partition {devices}"),
            },
            Step::Heal => "heal partitions".into(),
            Step::Flap {
                devices,
                period,
                duration,
                ..
            } => format!(
                "flap {devices} every {} for {}",
                humantime::format_duration(*period),
                humantime::format_duration(*duration)
            ),
            Step::HubRestart { down } => {
                format!("hub restart (down {})", humantime::format_duration(*down))
            }
            Step::Crash { devices, down, .. } => format!(
                "crash {devices} agents (down {})",
                humantime::format_duration(*down)
            ),
            Step::Drift {
                devices, resource, ..
            } => format!("drift {resource} on {devices}"),
            Step::Tamper { devices, .. } => format!("{devices} boot an unknown image"),
            Step::Accept { selector } => match selector {
                Some(s) => format!("accept the measurements of quarantined {s}"),
                None => "accept the measurements of quarantined devices".into(),
            },
            Step::Sleep { duration } => format!("sleep {}", humantime::format_duration(*duration)),
            Step::Release {
                version, broken, ..
            } => format!(
                "release {version}{}",
                if *broken { " (broken)" } else { "" }
            ),
            Step::OsSet {
                selector, version, ..
            } => format!("os {version} for {selector}"),
            Step::ConvergeOs { name, .. } => format!("converge OS ({name})"),
        }
    }
}

/// A label selector as written in a scenario, checked when the file is loaded.
#[derive(Debug, Clone)]
pub struct SelectorText(pub Selector);

impl<'de> Deserialize<'de> for SelectorText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<Selector>()
            .map(SelectorText)
            .map_err(|e| serde::de::Error::custom(format!("selector {s:?}: {e}")))
    }
}

impl fmt::Display for SelectorText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// How many devices a fault hits: `"20%"` of the matching devices, or a count `"200"`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Share {
    Percent(f64),
    Count(usize),
}

impl FromStr for Share {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let v: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("{s:?} is not a percentage like \"20%\""))?;
            if !(0.0..=100.0).contains(&v) {
                return Err(format!("{s:?}: a share must be between 0% and 100%"));
            }
            Ok(Share::Percent(v))
        } else {
            s.parse()
                .map(Share::Count)
                .map_err(|_| format!("{s:?} is neither a count (\"200\") nor a share (\"20%\")"))
        }
    }
}

impl<'de> Deserialize<'de> for Share {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(usize),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Count(n) => Ok(Share::Count(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl fmt::Display for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Share::Percent(p) => write!(f, "{p}% of devices"),
            Share::Count(n) => write!(f, "{n} devices"),
        }
    }
}

/// What is checked at the end of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Invariant {
    /// Every device has stored and applied its newest desired revision.
    AllConverged,
    /// Every report a device numbered is stored at the hub, exactly once, in order.
    ReportsExactlyOnce,
    /// Every device holds a state document whose signature verifies with the hub's key,
    /// and what it applied is exactly that document.
    SignedStateOnly,
    /// Every device enrolled with its (software) TPM and its last evidence verified:
    /// none quarantined, none unattested (unless the scenario says `attest = false`).
    AllAttested,
    /// Every box boots a slot holding exactly the release it committed (or the one it
    /// rolled back to), never an unverified one, and no upgrade is left half done.
    /// Checked in real mode for scenarios with `[upgrades]`.
    OsCommittedOrRolledBack,
}

impl Invariant {
    pub fn all() -> Vec<Invariant> {
        vec![
            Invariant::AllConverged,
            Invariant::ReportsExactlyOnce,
            Invariant::SignedStateOnly,
            Invariant::AllAttested,
            Invariant::OsCommittedOrRolledBack,
        ]
    }

    pub fn describe(self) -> &'static str {
        match self {
            Invariant::AllConverged => "every device converged on its newest desired state",
            Invariant::ReportsExactlyOnce => "no report lost or duplicated",
            Invariant::SignedStateOnly => "no device runs unsigned state",
            Invariant::AllAttested => "every device attested, its evidence verified",
            Invariant::OsCommittedOrRolledBack => {
                "every box runs a committed or rolled-back release, none unverified"
            }
        }
    }
}

impl Scenario {
    /// Reads a scenario file; errors name the file and what is wrong in it.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading scenario {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("scenario {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let mut s: Scenario = toml::from_str(text)?;
        s.validate()?;
        if !s.attest {
            s.check.retain(|i| *i != Invariant::AllAttested);
        }
        Ok(s)
    }

    fn validate(&self) -> Result<()> {
        if self.devices == 0 {
            bail!("devices must be at least 1");
        }
        for l in &self.labels {
            if l.values.is_empty() {
                bail!("label {:?} has no values", l.key);
            }
            for v in &l.values {
                parse_labels(&format!("{}={v}", l.key)).map_err(anyhow::Error::msg)?;
            }
        }
        if !self.attest
            && self
                .steps
                .iter()
                .any(|s| matches!(s, Step::Tamper { .. } | Step::Accept { .. }))
        {
            bail!("tamper and accept steps need attestation (attest = true)");
        }
        if let Some(p) = &self.attest_policy {
            if !self.attest {
                bail!("an attest-policy needs attestation (attest = true)");
            }
            p.validate()
                .map_err(|e| anyhow::anyhow!("attest-policy: {e}"))?;
        }
        if !(0.0..=1.0).contains(&self.network.loss) {
            bail!("network.loss must be between 0.0 and 1.0");
        }
        let mut versions = vec![semver::Version::new(1, 0, 0)];
        for (i, step) in self.steps.iter().enumerate() {
            match step {
                Step::Release {
                    version, changed, ..
                } => {
                    let v = semver::Version::parse(version)
                        .with_context(|| format!("step {}: release version {version:?}", i + 1))?;
                    if versions.contains(&v) {
                        bail!("step {}: release {version} is built twice", i + 1);
                    }
                    if !(0.0..=1.0).contains(changed) {
                        bail!("step {}: changed must be between 0.0 and 1.0", i + 1);
                    }
                    versions.push(v);
                }
                Step::OsSet { version, .. } => {
                    let v = semver::Version::parse(version)
                        .with_context(|| format!("step {}: version {version:?}", i + 1))?;
                    if !versions.contains(&v) {
                        bail!(
                            "step {}: os {version} is set before a release step builds it",
                            i + 1
                        );
                    }
                }
                _ => {}
            }
            if matches!(
                step,
                Step::Release { .. } | Step::OsSet { .. } | Step::ConvergeOs { .. }
            ) && self.upgrades.is_none()
            {
                bail!(
                    "step {}: OS upgrade steps need an [upgrades] table (the boxes' A/B slots)",
                    i + 1
                );
            }
            if let Step::Flap {
                period, duration, ..
            } = step
                && (period.is_zero() || duration < period)
            {
                bail!(
                    "step {}: flap needs a period > 0 and `for` >= period",
                    i + 1
                );
            }
        }
        Ok(())
    }

    /// Whether agents can talk to the hub directly: no step cuts a link or crashes an
    /// agent (a crash cuts the link first) and the network adds nothing.
    pub fn direct_links_suffice(&self) -> bool {
        self.network.latency.is_zero()
            && self.network.jitter.is_zero()
            && self.network.loss == 0.0
            && !self.steps.iter().any(|s| {
                matches!(
                    s,
                    Step::Partition { .. } | Step::Flap { .. } | Step::Crash { .. }
                )
            })
    }

    /// Labels of device `index`.
    pub fn labels_of(&self, index: usize) -> Labels {
        let text: Vec<String> = self
            .labels
            .iter()
            .map(|l| format!("{}={}", l.key, l.values[index % l.values.len()]))
            .collect();
        // Validated in `validate`.
        parse_labels(&text.join(",")).unwrap_or_default()
    }

    /// Devices grouped by identical labels, as `(labels "k=v,...", indices)`: real mode
    /// makes one join token per group.
    pub fn label_groups(&self) -> BTreeMap<String, Vec<usize>> {
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for i in 0..self.devices {
            let text: Vec<String> = self
                .labels
                .iter()
                .map(|l| format!("{}={}", l.key, l.values[i % l.values.len()]))
                .collect();
            groups.entry(text.join(",")).or_default().push(i);
        }
        groups
    }

    /// The devices (indices) step number `step` hits: the share of those matching
    /// `selector`, drawn from the scenario's seed and the step's position, so every run
    /// and both modes pick the same ones.
    pub fn pick(&self, step: usize, share: Share, selector: Option<&SelectorText>) -> Vec<usize> {
        let mut candidates: Vec<usize> = (0..self.devices)
            .filter(|i| selector.is_none_or(|s| s.0.matches(&self.labels_of(*i))))
            .collect();
        let n = match share {
            Share::Count(n) => n.min(candidates.len()),
            Share::Percent(p) => ((candidates.len() as f64) * p / 100.0).round() as usize,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            self.seed ^ (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        candidates.shuffle(&mut rng);
        candidates.truncate(n);
        candidates.sort_unstable();
        candidates
    }
}

/// Durations written as `"30s"`, `"1m 30s"`, `"250ms"`.
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map_err(|e| serde::de::Error::custom(format!("duration {s:?}: {e}")))
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer};

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            let s = Option::<String>::deserialize(d)?;
            s.map(|s| {
                humantime::parse_duration(&s)
                    .map_err(|e| serde::de::Error::custom(format!("duration {s:?}: {e}")))
            })
            .transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_scenarios_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                Scenario::load(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 2, "scenarios found: {n}");
        Scenario::parse(DEFAULT).unwrap();
    }

    #[test]
    fn bad_scenarios_say_what_is_wrong() {
        let base = "name = \"x\"\ndevices = 10\n";
        let err = |extra: &str| {
            format!(
                "{:#}",
                Scenario::parse(&format!("{base}{extra}")).unwrap_err()
            )
        };
        assert!(err("steps = [{ do = \"explode\" }]").contains("explode"));
        assert!(err("steps = [{ do = \"partition\", devices = \"120%\" }]").contains("between 0%"));
        assert!(err("steps = [{ do = \"sleep\", for = \"soon\" }]").contains("soon"));
        assert!(
            err("steps = [{ do = \"set\", selector = \"=x\", resource = \"a\", path = \"p\", content = \"\" }]")
                .contains("selector")
        );
        assert!(err("steps = []\ncheck = [\"everything-fine\"]").contains("everything-fine"));
    }

    #[test]
    fn picks_are_reproducible_and_respect_selectors() {
        let s = Scenario::parse(
            "name = \"x\"\ndevices = 100\nseed = 7\nsteps = []\n[[labels]]\nkey = \"site\"\nvalues = [\"a\", \"b\"]\n",
        )
        .unwrap();
        let sel = SelectorText("site=b".parse().unwrap());
        let a = s.pick(3, Share::Percent(20.0), Some(&sel));
        assert_eq!(a, s.pick(3, Share::Percent(20.0), Some(&sel)));
        assert_eq!(a.len(), 10);
        assert!(a.iter().all(|i| i % 2 == 1));
        assert_ne!(a, s.pick(4, Share::Percent(20.0), Some(&sel)));
        assert_eq!(s.pick(0, Share::Count(500), None).len(), 100);
        assert_eq!(s.label_groups().len(), 2);
    }
}
