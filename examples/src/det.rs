//! The fleet simulation's deterministic mode: the scenario's timeline against the real
//! sans-IO protocol cores, in virtual time, over a simulated network, reproducible from
//! the seed.
//!
//! # What is real
//!
//! Every device has a real [`AgentSession`] and, while connected, the hub a real
//! [`HubSession`]; frames are the real postcard frames those sessions emit. Desired state
//! is computed with the hub's own [`effective`] over [`Assignment`]s and [`Selector`]s
//! and signed with a real ed25519 hub key ([`sign_state`] over [`document_digest`]).
//!
//! Every decision is the shipped code's, called the way its tokio driver calls it:
//!
//! - the hub's [`SyncCore`] (`cairn_hub::sync`): what to send a device and when, one
//!   update in flight, snapshots on resync, reports acknowledged only once stored, the
//!   gate; this driver carries out its actions as the endpoint's connection
//!   task does;
//! - which update (delta or snapshot) and how long removals are remembered: the stores'
//!   own [`cairn_hub::store::revisions`], over this model's rows;
//! - the agent's [`offer`] (verify, store or refuse, ask for a snapshot), [`rebase`]
//!   (outbox renumbering) and [`Backoff`] (`cairn_agent::sync`);
//! - the agent's reconcile pass, [`reconcile::pass`], acting on a model of the box's
//!   files through the same [`Applier`] trait as the real file applier.
//!
//! Deliberate bugs ([`Sabotage`]) are switched on inside those cores, so the checks are
//! shown to catch a broken product, not a broken model.
//!
//! # What is modelled
//!
//! - **Durable vs volatile.** The hub's per-device rows (revision, signature, resources
//!   with their revisions, tombstones, stored reports) and each agent's database (desired
//!   document, `last_seq`, outbox, applied records, last status) are plain structs that
//!   survive crashes. Sessions, frames in flight, uncommitted report batches (hub) and
//!   timers are volatile and vanish with a crash.
//! - **Time.** A virtual clock in nanoseconds; the sessions see `base + offset` where
//!   `base` is one `Instant` captured at start. Nothing depends on real elapsed time.
//!   A discrete-event loop pops `(time, sequence number, event)` from a binary heap.
//! - **Network.** Per device and direction one ordered stream (QUIC streams are
//!   ordered): a frame is due at `max(previous due, now + latency + U(0, jitter))`; a
//!   "lost" packet is retransmitted after `max(3 × latency, 200 ms)`, possibly again
//!   (QUIC is reliable, loss only delays). Establishing a connection takes one round
//!   trip. Bytes counted are protocol frames only, no QUIC/TLS overhead.
//! - **Partitions and flaps.** While a link is cut, frames wait in its queue. A cut
//!   lasting the QUIC idle timeout ([`IDLE_TIMEOUT`], 30 s as the agent's default) kills
//!   the connection on both sides; the agent then reconnects with backoff. A connection
//!   attempt to an unreachable hub retransmits its first packet after 1, 3 and 7 s
//!   (QUIC's doubling probe timeout) and gives up after the agent's 15 s connect timeout.
//!   A flap cuts the link for the first half of every period.
//! - **Hub restart.** Every hub session dies at once and report batches not yet
//!   committed are lost; agents notice within a keep-alive interval (uniform in
//!   0..10 s) and reconnect. Operator actions issued while the hub is down are applied
//!   when it is back (the admin API is unreachable meanwhile).
//! - **Agent crash.** The agent's session, timers and reconnect state vanish; the hub
//!   keeps its side until the idle timeout, or until the agent's next connection
//!   replaces it. A restarted agent records `agent-started`, reconciles and connects.
//! - **Reconciler.** A pass runs right after a revision is stored and every
//!   [`RECONCILE_INTERVAL`] after the previous pass; passes that would find nothing to do
//!   are not simulated (they have no effect), so an idle fleet costs no events. The box
//!   is a set of files that are either as applied or changed by hand (drift).
//! - **Convergence.** A device has converged when the hub holds a status report saying
//!   it applied the hub's newest revision for it. A `converge` step waits for the hub to
//!   be up, then for every device that is neither partitioned nor crashed; each device's
//!   time counts from the later of the last operator action and the end of the last
//!   fault that hit it (its link came back, its agent restarted, the hub came back).
//!   After the timeline every fault ends at once and the run continues until all
//!   devices converged and every outbox is empty (at most [`DRAIN_LIMIT`]).
//! - **Hub store writes** other than reports (acknowledged revisions) are immediate;
//!   report batches are committed in group commits [`COMMIT_DELAY`] after they arrive.
//!
//! # What is left out
//!
//! Enrollment (devices start enrolled, with the hub key pinned), TLS, revocation,
//! device-targeted assignments, apply failures, restored databases, flow control and
//! the hub's CPU: protocol logic only, at the scale of the fleet.

use std::cell::RefCell;
use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use cairn_agent::apply::{Applier, ApplyError, Outcome};
use cairn_agent::reconcile;
use cairn_agent::store::{AppliedRecord, event_body, status_body};
use cairn_agent::sync::{Backoff, Reply, offer, rebase};
use cairn_hub::attest::DEFAULT_CHALLENGE_INTERVAL;
use cairn_hub::desired::{Assignment, Selector, Target, effective};
use cairn_hub::store::revisions::{UpdatePlan, tombstone_cutoff};
use cairn_hub::sync::{Action, Gate, SyncCore};
use cairn_sync_protocol::agent::{AgentEvent, AgentSession};
use cairn_sync_protocol::hub::{HubEvent, HubSession};
use cairn_sync_protocol::message::{
    EventKind, HubMessage, Labels, Report as ReportMsg, ReportBody,
};
use cairn_sync_protocol::sabotage;
use cairn_sync_protocol::state::{
    DocumentDigest, FileResource, Resource, StateDocument, StateUpdate, document_digest, sign_state,
};
use cairn_sync_protocol::{DeviceId, ResourceName, SessionConfig, Text, frame};
use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::report::{Events, InvariantResult, Phase, Report, Sample, Wire};
use crate::scenario::{Invariant, Scenario, Step};

/// Virtual time: nanoseconds since the simulation started.
type T = u64;

const MS: T = 1_000_000;
const SEC: T = 1_000 * MS;

/// QUIC idle timeout (the agent's default): a connection silent this long is dead.
pub const IDLE_TIMEOUT: T = 30 * SEC;
/// QUIC keep-alive interval of the agent: the longest an agent takes to notice a dead hub.
pub const KEEP_ALIVE: T = 10 * SEC;
/// Agent reconnect backoff bounds (the agent's defaults).
pub const BACKOFF_MIN: T = 500 * MS;
pub const BACKOFF_MAX: T = 60 * SEC;
/// The agent's connect timeout, and when an attempt to an unreachable hub retries its
/// first packet.
pub const CONNECT_TIMEOUT: T = 15 * SEC;
const PROBES: [T; 3] = [SEC, 3 * SEC, 7 * SEC];
/// Interval of the agent's periodic reconcile pass in this mode.
pub const RECONCILE_INTERVAL: T = 5 * SEC;
/// How long after a report batch arrives the hub's group commit makes it durable.
pub const COMMIT_DELAY: T = 5 * MS;

/// Group-commit delay under [`Sabotage::AckBeforeDurable`], long enough for a hub crash
/// to catch batches in it.
const SABOTAGE_COMMIT_DELAY: T = 2 * SEC;
/// Minimum retransmission delay of a lost packet.
const MIN_RTO: T = 200 * MS;
/// Agents start spread over this much time.
const START_SPREAD: T = SEC;
/// Longest wait for the whole fleet to connect before the timeline starts.
const WARM_UP_LIMIT: T = 120 * SEC;
/// Longest wait, after the timeline, for everything to converge and drain.
pub const DRAIN_LIMIT: T = 300 * SEC;
/// Most findings listed in the report.
const MAX_PROBLEMS: usize = 300;

/// Progress callback: fleet counts, index of the running step, its description.
pub type Progress = Box<dyn FnMut(&Sample, usize, &str)>;

/// Options of a deterministic run.
#[derive(Default)]
pub struct DetOptions {
    /// Called about once per simulated second with the fleet counts, the index of the
    /// step running and its description.
    pub progress: Option<Progress>,
    /// Breaks a guarantee on purpose, to show that the checks catch it (tests only).
    #[doc(hidden)]
    pub sabotage: Option<Sabotage>,
}

/// Deliberate bugs in the real cores, switched on for the run's thread
/// ([`cairn_sync_protocol::sabotage`]). With [`Sabotage::AckBeforeDurable`] the hub's
/// group commit is also slow (2 s), so that a hub crash lands in the window; with
/// [`Sabotage::SkipSignatureCheck`] a forged update is injected into every tenth
/// device's stream right after the first operator action.
#[doc(hidden)]
pub use cairn_sync_protocol::sabotage::Sabotage;

/// Switches the run's sabotage off again however the run ends.
struct SabotageGuard;

impl Drop for SabotageGuard {
    fn drop(&mut self) {
        let _ = sabotage::set(None);
    }
}

/// Runs `scenario` in virtual time and reports what happened.
pub fn run(scenario: &Scenario, opts: DetOptions) -> Result<Report> {
    if scenario.upgrades.is_some() {
        anyhow::bail!(
            "scenario {:?} has OS upgrades, which the deterministic mode does not model (it runs the protocol cores only); run it in real mode",
            scenario.name
        );
    }
    let wall = Instant::now();
    sabotage::set(opts.sabotage).map_err(|e| anyhow::anyhow!(e))?;
    let _guard = SabotageGuard;
    let mut sim = Sim::new(scenario, opts)?;
    sim.warm_up();
    for (i, step) in scenario.steps.iter().enumerate() {
        sim.step_index = i;
        sim.step_desc = step.describe();
        sim.step(i, step)
            .with_context(|| format!("step {} ({})", i + 1, sim.step_desc))?;
    }
    sim.step_index = scenario.steps.len();
    sim.step_desc = "ending faults, draining".into();
    sim.end_faults();
    sim.drain();
    // The checks run on sound code.
    drop(_guard);
    let mut report = sim.finish();
    report.wall_secs = wall.elapsed().as_secs_f64();
    Ok(report)
}

// ---------------------------------------------------------------------------------------
// Events

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    ToHub,
    ToAgent,
}

#[derive(Debug)]
enum Ev {
    /// The agent process starts (or restarts after a crash).
    AgentStart(u32),
    /// The agent begins a connection attempt.
    Attempt {
        dev: u32,
        attempt: u32,
    },
    /// A connection attempt retransmits its first packet.
    Probe {
        dev: u32,
        attempt: u32,
        k: usize,
    },
    /// A connection attempt gives up.
    AttemptFailed {
        dev: u32,
        attempt: u32,
    },
    /// The handshake of an attempt completes.
    Established {
        dev: u32,
        attempt: u32,
    },
    /// The head of a link queue may be due.
    Deliver {
        dev: u32,
        dir: Dir,
    },
    AgentTimer {
        dev: u32,
        epoch: u32,
    },
    HubTimer {
        dev: u32,
        epoch: u32,
    },
    /// A link cut that began with `cut_gen` has lasted the idle timeout.
    IdleDeath {
        dev: u32,
        epoch: u32,
        cut_gen: u32,
    },
    /// The agent notices (keep-alive unanswered) that the hub is gone.
    AgentNoticesHubGone {
        dev: u32,
        epoch: u32,
    },
    /// The hub's idle timeout for a connection whose agent crashed.
    HubIdle {
        dev: u32,
        epoch: u32,
    },
    Reconcile {
        dev: u32,
    },
    Commit,
    Sample,
    PartitionEnd {
        instance: u32,
    },
    FlapToggle {
        flap: usize,
        n: u64,
    },
    HubUp,
}

struct Queued {
    at: T,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

// ---------------------------------------------------------------------------------------
// State

/// One direction of a device's link: an ordered stream.
#[derive(Default)]
struct Link {
    /// Frames with the time they are due and the connection they belong to.
    queue: VecDeque<(T, u32, Vec<u8>)>,
    last_due: T,
    /// When the pending `Deliver` event fires (stale events are ignored).
    deliver_at: Option<T>,
}

/// What the agent's SQLite database holds, and the box's files.
#[derive(Default)]
struct AgentDurable {
    doc: Option<StateDocument>,
    last_seq: u64,
    outbox: VecDeque<ReportMsg>,
    /// The reconciler's applied records, by resource name.
    applied: BTreeMap<String, AppliedRecord>,
    /// (desired, applied, failing) of the last status report.
    last_status: (u64, u64, u32),
    /// The box: managed files by path, each with the spec hash of the resource it is
    /// as (a drifted file holds another value).
    files: Vec<(String, [u8; 32])>,
}

/// The box's files as the agent's [`Applier`] sees them, for its own reconcile pass.
struct ModelBox<'a>(RefCell<&'a mut Vec<(String, [u8; 32])>>);

impl Applier for ModelBox<'_> {
    fn apply(&self, resource: &Resource) -> Result<Outcome, ApplyError> {
        let path = self.locate(resource)?;
        let want = resource.hash().0;
        let mut files = self.0.borrow_mut();
        match files.iter_mut().find(|(p, _)| *p == path) {
            Some((_, h)) if *h == want => Ok(Outcome::Unchanged),
            Some((_, h)) => {
                *h = want;
                Ok(Outcome::Changed {
                    before: "content differs".into(),
                })
            }
            None => {
                files.push((path, want));
                Ok(Outcome::Changed {
                    before: "absent".into(),
                })
            }
        }
    }

    fn remove(&self, recorded_path: &str) -> Result<bool, ApplyError> {
        let mut files = self.0.borrow_mut();
        let before = files.len();
        files.retain(|(p, _)| p != recorded_path);
        Ok(files.len() < before)
    }

    fn locate(&self, resource: &Resource) -> Result<String, ApplyError> {
        match resource {
            Resource::File(f) => Ok(f.path.as_str().to_string()),
            Resource::Os(_) => Err(ApplyError::WrongKind("os")),
        }
    }
}

struct AgentConn {
    epoch: u32,
    session: AgentSession,
    synced: bool,
    timer_at: Option<T>,
}

/// What the hub's database holds for one device.
#[derive(Default)]
struct HubDurable {
    revision: u64,
    signature: Option<Signature>,
    tomb_floor: u64,
    /// (name id, resource id, revision), in name order.
    resources: Vec<(u16, u32, u64)>,
    /// (name id, revision of removal).
    tombstones: Vec<(u16, u64)>,
    stored_revision: u64,
    applied_revision: u64,
    /// Highest report sequence number stored or declared lost.
    reports_acked: u64,
    reports_stored: u64,
    reports_skipped: u64,
    reports_duplicated: u64,
    drift_corrected: u64,
}

struct HubConn {
    epoch: u32,
    session: HubSession,
    /// The hub's decisions for this session (the endpoint's own core).
    core: SyncCore,
    synced: bool,
    timer_at: Option<T>,
}

struct Dev {
    // Link.
    partition: u32,
    flap_down: bool,
    cut_gen: u32,
    epoch: u32,
    up: Link,
    down: Link,
    // Agent.
    agent_up: bool,
    agent: AgentDurable,
    aconn: Option<Box<AgentConn>>,
    attempt: u32,
    attempt_start: T,
    backoff: Backoff,
    last_pass: T,
    pass_at: Option<T>,
    // Hub.
    hub: HubDurable,
    hconn: Option<Box<HubConn>>,
    // Hub's view of convergence.
    converged: bool,
    converged_at: T,
    /// When a fault of this device last ended (link back, agent restarted).
    fault_end: T,
}

impl Dev {
    fn cut(&self) -> bool {
        self.partition != 0 || self.flap_down
    }
}

struct Group {
    labels: Labels,
    /// A device of the group, for `effective` (selector assignments only here).
    rep: DeviceId,
    members: Vec<u32>,
}

/// A batch waiting for the hub's group commit.
enum PendingWrite {
    Reports(Vec<ReportMsg>),
    Lost { from: u64, to: u64 },
}

/// An ongoing `converge` step.
struct Wait {
    /// Per device: 0 not required, 1 pending, 2 converged.
    state: Vec<u8>,
    pending: usize,
    times: Vec<u64>,
}

struct Flap {
    devices: Vec<u32>,
    start: T,
    half: T,
    end: T,
    active: bool,
}

struct Sim<'a> {
    scenario: &'a Scenario,
    sabotage: Option<Sabotage>,
    progress: Option<Progress>,
    step_index: usize,
    step_desc: String,
    base: Instant,
    now: T,
    t0: T,
    seq: u64,
    heap: BinaryHeap<Reverse<Queued>>,
    rng: StdRng,
    cfg: SessionConfig,
    latency: T,
    jitter: T,
    loss: f64,
    rto: T,

    ids: Vec<DeviceId>,
    devs: Vec<Dev>,
    groups: Vec<Group>,

    // Hub.
    key: SigningKey,
    vk: VerifyingKey,
    hub_up: bool,
    assignments: Vec<Assignment>,
    next_order: i64,
    names: Vec<ResourceName>,
    resources: Vec<Resource>,
    pending: Vec<(u32, u32, PendingWrite)>,
    commit_at: Option<T>,
    deferred: Vec<Step>,

    // Faults.
    next_partition: u32,
    partition_ends: BTreeMap<u32, Vec<u32>>,
    flaps: Vec<Flap>,
    crashed: Vec<u32>,
    forged: bool,

    // Tracking.
    online: usize,
    converged: usize,
    queued: u64,
    wait: Option<Wait>,
    last_action: T,
    /// When the hub last came back (a fault of every device ended).
    hub_back: T,

    report: Report,
}

fn ns(d: Duration) -> T {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn ms(t: T) -> u64 {
    t / MS
}

impl<'a> Sim<'a> {
    fn new(scenario: &'a Scenario, opts: DetOptions) -> Result<Self> {
        let n = scenario.devices;
        if n == 0 {
            bail!("the scenario has no devices");
        }
        if u32::try_from(n).is_err() {
            bail!("{n} devices is more than this simulator handles");
        }
        let mut rng = StdRng::seed_from_u64(scenario.seed);
        let key = SigningKey::from_bytes(&rng.r#gen::<[u8; 32]>());
        let vk = key.verifying_key();
        let width = (n - 1).to_string().len().max(5);
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            ids.push(DeviceId::new(&format!("dev-{i:0width$}"))?);
        }
        // Devices with the same label values share one effective document.
        let mut by_key: BTreeMap<Vec<usize>, u32> = BTreeMap::new();
        let mut groups: Vec<Group> = Vec::new();
        let mut devs = Vec::with_capacity(n);
        for (i, id) in ids.iter().enumerate() {
            let key: Vec<usize> = scenario
                .labels
                .iter()
                .map(|l| i % l.values.len().max(1))
                .collect();
            let g = match by_key.get(&key) {
                Some(g) => *g,
                None => {
                    let g = u32::try_from(groups.len())?;
                    groups.push(Group {
                        labels: scenario.labels_of(i),
                        rep: id.clone(),
                        members: Vec::new(),
                    });
                    by_key.insert(key, g);
                    g
                }
            };
            groups[g as usize].members.push(u32::try_from(i)?);
            devs.push(Dev {
                partition: 0,
                flap_down: false,
                cut_gen: 0,
                epoch: 0,
                up: Link::default(),
                down: Link::default(),
                agent_up: false,
                agent: AgentDurable::default(),
                aconn: None,
                attempt: 0,
                attempt_start: 0,
                backoff: Backoff::new(
                    Duration::from_nanos(BACKOFF_MIN),
                    Duration::from_nanos(BACKOFF_MAX),
                ),
                last_pass: 0,
                pass_at: None,
                hub: HubDurable::default(),
                hconn: None,
                // Nothing desired yet, nothing applied: converged.
                converged: true,
                converged_at: 0,
                fault_end: 0,
            });
        }
        let net = &scenario.network;
        let latency = ns(net.latency);
        Ok(Sim {
            scenario,
            sabotage: opts.sabotage,
            progress: opts.progress,
            step_index: 0,
            step_desc: "fleet connecting".into(),
            base: Instant::now(),
            now: 0,
            t0: 0,
            seq: 0,
            heap: BinaryHeap::new(),
            rng,
            cfg: SessionConfig::default(),
            latency,
            jitter: ns(net.jitter),
            loss: net.loss.clamp(0.0, 0.99),
            rto: (3 * latency).max(MIN_RTO),
            ids,
            devs,
            groups,
            key,
            vk,
            hub_up: true,
            assignments: Vec::new(),
            next_order: 1,
            names: Vec::new(),
            resources: Vec::new(),
            pending: Vec::new(),
            commit_at: None,
            deferred: Vec::new(),
            next_partition: 1,
            partition_ends: BTreeMap::new(),
            flaps: Vec::new(),
            crashed: Vec::new(),
            forged: false,
            online: 0,
            converged: n,
            queued: 0,
            wait: None,
            last_action: 0,
            hub_back: 0,
            report: Report {
                scenario: scenario.name.clone(),
                mode: "deterministic".into(),
                seed: scenario.seed,
                devices: n,
                wire: Wire {
                    counted: "protocol frames (deterministic mode, no QUIC/TLS overhead)".into(),
                    ..Wire::default()
                },
                ..Report::default()
            },
        })
    }

    fn instant(&self, t: T) -> Instant {
        self.base + Duration::from_nanos(t)
    }

    fn virt(&self, i: Instant) -> T {
        ns(i.saturating_duration_since(self.base))
    }

    fn schedule(&mut self, at: T, ev: Ev) {
        self.seq += 1;
        self.heap.push(Reverse(Queued {
            at: at.max(self.now),
            seq: self.seq,
            ev,
        }));
    }

    /// One-way delay of a packet: latency, jitter, and a retransmission per loss.
    fn delay(&mut self) -> T {
        let mut d = self.latency;
        if self.jitter > 0 {
            d += self.rng.gen_range(0..=self.jitter);
        }
        while self.loss > 0.0 && self.rng.gen_bool(self.loss) {
            d += self.rto;
        }
        d
    }

    fn problem(&mut self, p: String) {
        if self.report.problems.len() < MAX_PROBLEMS {
            self.report.problems.push(p);
        }
    }

    // -----------------------------------------------------------------------------------
    // The event loop

    /// Runs events up to `deadline` or until `done` holds; returns whether `done` held.
    fn run_until(&mut self, deadline: T, done: impl Fn(&Self) -> bool) -> bool {
        loop {
            if done(self) {
                return true;
            }
            let Some(Reverse(top)) = self.heap.peek() else {
                break;
            };
            if top.at > deadline {
                break;
            }
            let Some(Reverse(q)) = self.heap.pop() else {
                break;
            };
            self.now = self.now.max(q.at);
            self.handle(q.ev);
        }
        self.now = self.now.max(deadline);
        done(self)
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::AgentStart(dev) => self.agent_start(dev),
            Ev::Attempt { dev, attempt } => self.attempt(dev, attempt),
            Ev::Probe { dev, attempt, k } => self.probe(dev, attempt, k),
            Ev::AttemptFailed { dev, attempt } => {
                if self.attempt_current(dev, attempt) {
                    self.attempt_failed(dev);
                }
            }
            Ev::Established { dev, attempt } => self.established(dev, attempt),
            Ev::Deliver { dev, dir } => self.deliver(dev, dir),
            Ev::AgentTimer { dev, epoch } => {
                let now = self.now;
                let inst = self.instant(now);
                let Some(c) = self.devs[dev as usize].aconn.as_mut() else {
                    return;
                };
                if c.epoch != epoch || c.timer_at != Some(now) {
                    return;
                }
                c.timer_at = None;
                c.session.handle_timeout(inst);
                self.agent_pump(dev);
            }
            Ev::HubTimer { dev, epoch } => {
                let now = self.now;
                let inst = self.instant(now);
                let Some(c) = self.devs[dev as usize].hconn.as_mut() else {
                    return;
                };
                if c.epoch != epoch || c.timer_at != Some(now) {
                    return;
                }
                c.timer_at = None;
                c.session.handle_timeout(inst);
                self.hub_pump(dev);
            }
            Ev::IdleDeath {
                dev,
                epoch,
                cut_gen,
            } => {
                let d = &self.devs[dev as usize];
                if d.cut() && d.cut_gen == cut_gen && d.epoch == epoch {
                    self.hub_drop(dev, epoch);
                    self.agent_conn_lost(dev, epoch);
                    let d = &mut self.devs[dev as usize];
                    d.up = Link::default();
                    d.down = Link::default();
                }
            }
            Ev::AgentNoticesHubGone { dev, epoch } => self.agent_conn_lost(dev, epoch),
            Ev::HubIdle { dev, epoch } => self.hub_drop(dev, epoch),
            Ev::Reconcile { dev } => {
                if self.devs[dev as usize].pass_at == Some(self.now) {
                    self.devs[dev as usize].pass_at = None;
                    self.reconcile(dev);
                }
            }
            Ev::Commit => self.commit(),
            Ev::Sample => self.sample(),
            Ev::PartitionEnd { instance } => {
                if let Some(devs) = self.partition_ends.remove(&instance) {
                    for dev in devs {
                        if self.devs[dev as usize].partition == instance {
                            self.set_partition(dev, 0);
                        }
                    }
                }
            }
            Ev::FlapToggle { flap, n } => self.flap_toggle(flap, n),
            Ev::HubUp => self.hub_start(),
        }
    }

    fn sample(&mut self) {
        let s = Sample {
            t_ms: ms(self.now.saturating_sub(self.t0)),
            online: self.online,
            converged: self.converged,
            queued: self.queued,
            ..Sample::default()
        };
        self.report.timeline.push(s);
        if let Some(p) = self.progress.as_mut() {
            p(&s, self.step_index, &self.step_desc);
        }
        self.schedule(self.now + SEC, Ev::Sample);
    }

    // -----------------------------------------------------------------------------------
    // Timeline

    fn warm_up(&mut self) {
        for dev in 0..self.devs.len() as u32 {
            let at = self.rng.gen_range(0..START_SPREAD);
            self.schedule(at, Ev::AgentStart(dev));
        }
        let n = self.devs.len();
        if !self.run_until(WARM_UP_LIMIT, |s| s.online == n) {
            let msg = format!(
                "only {} of {n} devices connected within {} s of starting",
                self.online,
                WARM_UP_LIMIT / SEC
            );
            self.problem(msg);
        }
        self.t0 = self.now;
        self.last_action = self.now;
        self.hub_back = self.now;
        self.schedule(self.now, Ev::Sample);
    }

    fn step(&mut self, index: usize, step: &Step) -> Result<()> {
        let sc = self.scenario;
        match step {
            Step::Set { .. } | Step::Unset { .. } => {
                if self.hub_up {
                    self.operator(step)?;
                } else {
                    self.deferred.push(step.clone());
                }
            }
            Step::Converge { name, timeout } => self.converge(name, ns(*timeout)),
            // Refused in `run`: scenarios with upgrades run in real mode.
            Step::Release { .. } | Step::OsSet { .. } | Step::ConvergeOs { .. } => {}
            Step::Partition {
                devices,
                selector,
                duration,
            } => {
                let picked = sc.pick(index, *devices, selector.as_ref());
                self.report.faults.partitions += picked.len() as u64;
                let instance = self.next_partition;
                self.next_partition += 1;
                for &d in &picked {
                    self.set_partition(d as u32, instance);
                }
                if let Some(d) = duration {
                    self.partition_ends
                        .insert(instance, picked.iter().map(|&d| d as u32).collect());
                    self.schedule(self.now + ns(*d), Ev::PartitionEnd { instance });
                }
            }
            Step::Heal => self.heal(),
            Step::Flap {
                devices,
                selector,
                period,
                duration,
            } => {
                let picked: Vec<u32> = sc
                    .pick(index, *devices, selector.as_ref())
                    .into_iter()
                    .map(|d| d as u32)
                    .collect();
                self.report.faults.flaps += picked.len() as u64;
                let half = (ns(*period) / 2).max(1);
                self.flaps.push(Flap {
                    devices: picked,
                    start: self.now,
                    half,
                    end: self.now + ns(*duration),
                    active: true,
                });
                self.flap_toggle(self.flaps.len() - 1, 0);
            }
            Step::HubRestart { down } => {
                self.report.faults.hub_restarts += 1;
                self.hub_crash();
                self.schedule(self.now + ns(*down), Ev::HubUp);
            }
            Step::Crash {
                devices,
                selector,
                down,
            } => {
                let picked = sc.pick(index, *devices, selector.as_ref());
                self.report.faults.agent_crashes += picked.len() as u64;
                for d in picked {
                    let d = d as u32;
                    self.agent_crash(d);
                    self.schedule(self.now + ns(*down), Ev::AgentStart(d));
                }
            }
            Step::Drift {
                devices,
                selector,
                resource,
            } => {
                for d in sc.pick(index, *devices, selector.as_ref()) {
                    self.drift(d as u32, resource);
                }
            }
            Step::Sleep { duration } => {
                let until = self.now + ns(*duration);
                self.run_until(until, |_| false);
            }
        }
        Ok(())
    }

    /// Where a device's convergence time is counted from: the last operator action or
    /// the end of the last fault that hit it, whichever is later.
    fn reference(&self, dev: usize) -> T {
        self.last_action
            .max(self.hub_back)
            .max(self.devs[dev].fault_end)
    }

    fn converge(&mut self, name: &str, timeout: T) {
        let deadline = self.now + timeout;
        // A hub that is down sees nothing; operator actions wait for it too.
        self.run_until(deadline, |s| s.hub_up);
        let mut w = Wait {
            state: vec![0; self.devs.len()],
            pending: 0,
            times: Vec::new(),
        };
        for (i, d) in self.devs.iter().enumerate() {
            if d.partition != 0 || !d.agent_up {
                continue; // cut off
            }
            if d.converged {
                // Converged before the reference point: nothing changed for this
                // device since, so it has no time to count in this phase.
                if d.converged_at < self.reference(i) {
                    continue;
                }
                w.state[i] = 2;
                w.times
                    .push(ms(d.converged_at.saturating_sub(self.reference(i))));
            } else {
                w.state[i] = 1;
                w.pending += 1;
            }
        }
        let required = w.times.len() + w.pending;
        self.wait = Some(w);
        self.run_until(deadline, |s| s.wait.as_ref().is_none_or(|w| w.pending == 0));
        let Some(w) = self.wait.take() else {
            return;
        };
        if w.pending > 0 {
            let late: Vec<String> = w
                .state
                .iter()
                .enumerate()
                .filter(|(_, s)| **s == 1)
                .take(5)
                .map(|(i, _)| self.ids[i].to_string())
                .collect();
            self.problem(format!(
                "phase {name:?}: {} of {required} devices did not converge within {} s (e.g. {})",
                w.pending,
                timeout / SEC,
                late.join(", ")
            ));
        }
        self.report
            .phases
            .push(Phase::from_times(name, required, w.times));
    }

    fn end_faults(&mut self) {
        if !self.hub_up {
            self.hub_start();
        }
        self.heal();
        for f in 0..self.flaps.len() {
            if self.flaps[f].active {
                self.flaps[f].active = false;
                for i in 0..self.flaps[f].devices.len() {
                    let d = self.flaps[f].devices[i];
                    self.set_flap(d, false);
                }
            }
        }
        self.partition_ends.clear();
        for d in std::mem::take(&mut self.crashed) {
            self.agent_start(d);
        }
    }

    fn drain(&mut self) {
        let n = self.devs.len();
        let deadline = self.now + DRAIN_LIMIT;
        let done = self.run_until(deadline, |s| {
            s.converged == n && s.queued == 0 && s.pending.is_empty()
        });
        if !done {
            self.problem(format!(
                "after the timeline: {} of {n} devices converged and {} reports still queued after {} s",
                self.converged,
                self.queued,
                DRAIN_LIMIT / SEC
            ));
        }
    }

    fn heal(&mut self) {
        for d in 0..self.devs.len() as u32 {
            if self.devs[d as usize].partition != 0 {
                self.set_partition(d, 0);
            }
        }
    }

    fn flap_toggle(&mut self, flap: usize, n: u64) {
        let Some(f) = self.flaps.get(flap) else {
            return;
        };
        if !f.active {
            return;
        }
        let at = f.start + n * f.half;
        let ended = at >= f.end;
        let down = !ended && n.is_multiple_of(2);
        let next = f.start + (n + 1) * f.half;
        let end = f.end;
        let count = f.devices.len();
        for i in 0..count {
            let d = self.flaps[flap].devices[i];
            self.set_flap(d, down);
        }
        if ended {
            self.flaps[flap].active = false;
        } else {
            self.schedule(next.min(end), Ev::FlapToggle { flap, n: n + 1 });
        }
    }

    // -----------------------------------------------------------------------------------
    // Links

    fn set_partition(&mut self, dev: u32, instance: u32) {
        let was = self.devs[dev as usize].cut();
        self.devs[dev as usize].partition = instance;
        self.cut_changed(dev, was);
    }

    fn set_flap(&mut self, dev: u32, down: bool) {
        let was = self.devs[dev as usize].cut();
        self.devs[dev as usize].flap_down = down;
        self.cut_changed(dev, was);
    }

    fn cut_changed(&mut self, dev: u32, was: bool) {
        let is = self.devs[dev as usize].cut();
        if was == is {
            return;
        }
        if is {
            let d = &mut self.devs[dev as usize];
            d.cut_gen += 1;
            let (epoch, cut_gen) = (d.epoch, d.cut_gen);
            if d.aconn.is_some() || d.hconn.is_some() {
                self.schedule(
                    self.now + IDLE_TIMEOUT,
                    Ev::IdleDeath {
                        dev,
                        epoch,
                        cut_gen,
                    },
                );
            }
        } else {
            self.devs[dev as usize].fault_end = self.now;
            // Frames held during the cut are retransmitted now.
            for dir in [Dir::ToHub, Dir::ToAgent] {
                let n = self.link(dev, dir).queue.len();
                for i in 0..n {
                    let due = self.now + self.delay();
                    let l = self.link_mut(dev, dir);
                    let due = due.max(l.last_due);
                    l.queue[i].0 = due;
                    l.last_due = due;
                }
                self.link_mut(dev, dir).deliver_at = None;
                self.arm_link(dev, dir);
            }
        }
    }

    fn link(&self, dev: u32, dir: Dir) -> &Link {
        let d = &self.devs[dev as usize];
        match dir {
            Dir::ToHub => &d.up,
            Dir::ToAgent => &d.down,
        }
    }

    fn link_mut(&mut self, dev: u32, dir: Dir) -> &mut Link {
        let d = &mut self.devs[dev as usize];
        match dir {
            Dir::ToHub => &mut d.up,
            Dir::ToAgent => &mut d.down,
        }
    }

    /// Schedules delivery of the link's head frame unless already scheduled by then.
    fn arm_link(&mut self, dev: u32, dir: Dir) {
        if self.devs[dev as usize].cut() {
            return;
        }
        let l = self.link_mut(dev, dir);
        let Some(&(due, _, _)) = l.queue.front() else {
            return;
        };
        if l.deliver_at.is_some_and(|at| at <= due) {
            return;
        }
        l.deliver_at = Some(due);
        self.schedule(due, Ev::Deliver { dev, dir });
    }

    fn send(&mut self, dev: u32, dir: Dir, epoch: u32, bytes: Vec<u8>) {
        match dir {
            Dir::ToHub => self.report.wire.to_hub += bytes.len() as u64,
            Dir::ToAgent => self.report.wire.from_hub += bytes.len() as u64,
        }
        let due = self.now + self.delay();
        let l = self.link_mut(dev, dir);
        let due = due.max(l.last_due);
        l.last_due = due;
        l.queue.push_back((due, epoch, bytes));
        self.arm_link(dev, dir);
    }

    fn deliver(&mut self, dev: u32, dir: Dir) {
        let now = self.now;
        if self.link(dev, dir).deliver_at != Some(now) {
            return; // superseded
        }
        self.link_mut(dev, dir).deliver_at = None;
        if self.devs[dev as usize].cut() {
            return; // re-armed when the cut ends
        }
        loop {
            let l = self.link_mut(dev, dir);
            if l.queue.front().is_none_or(|f| f.0 > now) {
                break;
            }
            let Some((_, epoch, bytes)) = l.queue.pop_front() else {
                break;
            };
            let inst = self.instant(now);
            match dir {
                Dir::ToHub => {
                    if !self.hub_up {
                        continue;
                    }
                    let Some(c) = self.devs[dev as usize].hconn.as_mut() else {
                        continue;
                    };
                    if c.epoch != epoch {
                        continue;
                    }
                    c.session.handle_input(inst, &bytes);
                    self.hub_pump(dev);
                }
                Dir::ToAgent => {
                    let Some(c) = self.devs[dev as usize].aconn.as_mut() else {
                        continue;
                    };
                    if c.epoch != epoch {
                        continue;
                    }
                    c.session.handle_input(inst, &bytes);
                    self.agent_pump(dev);
                }
            }
        }
        self.arm_link(dev, dir);
    }

    // -----------------------------------------------------------------------------------
    // Connections

    fn reachable(&self, dev: u32) -> bool {
        self.hub_up && !self.devs[dev as usize].cut()
    }

    fn attempt_current(&self, dev: u32, attempt: u32) -> bool {
        let d = &self.devs[dev as usize];
        d.agent_up && d.attempt == attempt && d.aconn.is_none()
    }

    fn attempt(&mut self, dev: u32, attempt: u32) {
        if !self.attempt_current(dev, attempt) {
            return;
        }
        self.devs[dev as usize].attempt_start = self.now;
        if self.reachable(dev) {
            let rtt = self.delay() + self.delay();
            self.schedule(self.now + rtt, Ev::Established { dev, attempt });
        } else {
            self.schedule(self.now + PROBES[0], Ev::Probe { dev, attempt, k: 0 });
        }
    }

    fn probe(&mut self, dev: u32, attempt: u32, k: usize) {
        if !self.attempt_current(dev, attempt) {
            return;
        }
        let start = self.devs[dev as usize].attempt_start;
        if self.reachable(dev) {
            let rtt = self.delay() + self.delay();
            self.schedule(self.now + rtt, Ev::Established { dev, attempt });
        } else if let Some(next) = PROBES.get(k + 1) {
            self.schedule(
                start + next,
                Ev::Probe {
                    dev,
                    attempt,
                    k: k + 1,
                },
            );
        } else {
            self.schedule(start + CONNECT_TIMEOUT, Ev::AttemptFailed { dev, attempt });
        }
    }

    /// The agent's own jittered exponential backoff, on the seeded generator.
    fn backoff_delay(&mut self, dev: u32) -> T {
        ns(self.devs[dev as usize]
            .backoff
            .next_delay_with(&mut self.rng))
    }

    fn attempt_failed(&mut self, dev: u32) {
        let delay = self.backoff_delay(dev);
        let d = &mut self.devs[dev as usize];
        d.attempt += 1;
        let attempt = d.attempt;
        self.schedule(self.now + delay, Ev::Attempt { dev, attempt });
    }

    fn established(&mut self, dev: u32, attempt: u32) {
        if !self.attempt_current(dev, attempt) {
            return;
        }
        if !self.reachable(dev) {
            return self.attempt_failed(dev);
        }
        let now = self.now;
        let inst = self.instant(now);
        let held = self.devs[dev as usize]
            .agent
            .doc
            .as_ref()
            .map_or(0, |d| d.revision);
        let tail = self.devs[dev as usize].agent.last_seq;
        let mut session = AgentSession::sync(inst, self.cfg.clone(), held, "cairn-det");
        session.outbox_tail(inst, tail);
        let hub_session = HubSession::new(inst, &self.cfg);
        let d = &mut self.devs[dev as usize];
        d.epoch += 1;
        let epoch = d.epoch;
        d.up = Link::default();
        d.down = Link::default();
        // A new connection from the device replaces the hub's old one, as the registry
        // supersedes it.
        d.hconn = Some(Box::new(HubConn {
            epoch,
            session: hub_session,
            core: SyncCore::new(DEFAULT_CHALLENGE_INTERVAL),
            synced: false,
            timer_at: None,
        }));
        d.aconn = Some(Box::new(AgentConn {
            epoch,
            session,
            synced: false,
            timer_at: None,
        }));
        self.agent_pump(dev);
        self.hub_pump(dev);
    }

    /// The agent's connection `epoch` is gone: reconnect after a backoff.
    fn agent_conn_lost(&mut self, dev: u32, epoch: u32) {
        let d = &mut self.devs[dev as usize];
        if d.aconn.as_ref().is_none_or(|c| c.epoch != epoch) {
            return;
        }
        if let Some(c) = d.aconn.take()
            && c.synced
        {
            self.online -= 1;
        }
        self.attempt_failed(dev);
    }

    fn hub_drop(&mut self, dev: u32, epoch: u32) {
        let d = &mut self.devs[dev as usize];
        if d.hconn.as_ref().is_some_and(|c| c.epoch == epoch) {
            d.hconn = None;
        }
    }

    // -----------------------------------------------------------------------------------
    // Agent

    fn agent_start(&mut self, dev: u32) {
        if self.devs[dev as usize].agent_up {
            return;
        }
        self.crashed.retain(|&d| d != dev);
        let now = self.now;
        let d = &mut self.devs[dev as usize];
        d.agent_up = true;
        d.backoff.reset();
        d.attempt += 1;
        d.fault_end = now;
        let attempt = d.attempt;
        self.push_reports(
            dev,
            vec![event_body(
                EventKind::AgentStarted,
                None,
                None,
                "cairn-agent started",
            )],
        );
        self.reconcile(dev);
        self.attempt(dev, attempt);
    }

    fn agent_crash(&mut self, dev: u32) {
        let d = &mut self.devs[dev as usize];
        if !d.agent_up {
            return;
        }
        d.agent_up = false;
        d.pass_at = None;
        d.attempt += 1;
        let epoch = d.epoch;
        let had_conn = d.aconn.is_some();
        if let Some(c) = d.aconn.take()
            && c.synced
        {
            self.online -= 1;
        }
        if had_conn {
            self.schedule(self.now + IDLE_TIMEOUT, Ev::HubIdle { dev, epoch });
        }
        self.crashed.push(dev);
    }

    fn drift(&mut self, dev: u32, resource: &ResourceName) {
        let d = &mut self.devs[dev as usize];
        let Some(rec) = d.agent.applied.get(resource.as_str()) else {
            return; // not managed on this device
        };
        let Some(file) = d.agent.files.iter_mut().find(|(p, _)| *p == rec.path) else {
            return;
        };
        // Changed by hand: no longer what any resource specifies.
        file.1 = [0xd7; 32];
        // The next periodic pass finds it.
        let since = self.now.saturating_sub(d.last_pass);
        let periods = since.div_ceil(RECONCILE_INTERVAL).max(1);
        let at = d.last_pass + periods * RECONCILE_INTERVAL;
        self.schedule_pass(dev, at);
    }

    fn schedule_pass(&mut self, dev: u32, at: T) {
        let d = &mut self.devs[dev as usize];
        if !d.agent_up || d.pass_at.is_some_and(|p| p <= at) {
            return;
        }
        d.pass_at = Some(at);
        self.schedule(at, Ev::Reconcile { dev });
    }

    /// Appends reports to the outbox (one transaction) and tells the session.
    fn push_reports(&mut self, dev: u32, bodies: Vec<ReportBody>) {
        if bodies.is_empty() {
            return;
        }
        let at_ms = ms(self.now);
        let inst = self.instant(self.now);
        let d = &mut self.devs[dev as usize];
        for body in bodies {
            d.agent.last_seq += 1;
            d.agent.outbox.push_back(ReportMsg {
                seq: d.agent.last_seq,
                at_ms,
                body,
            });
            self.queued += 1;
        }
        let tail = d.agent.last_seq;
        if let Some(c) = d.aconn.as_mut() {
            c.session.outbox_tail(inst, tail);
            self.agent_pump(dev);
        }
    }

    /// One pass of the agent's own reconciler ([`reconcile::pass`]) over the model box;
    /// its record is one transaction of the model database.
    fn reconcile(&mut self, dev: u32) {
        let now = self.now;
        let d = &mut self.devs[dev as usize];
        if !d.agent_up {
            return;
        }
        d.last_pass = now;
        let a = &mut d.agent;
        let files = ModelBox(RefCell::new(&mut a.files));
        let pass = match reconcile::pass(a.doc.as_ref(), &a.applied, a.last_status, &files) {
            Ok(p) => p,
            Err(e) => {
                let msg = format!("{}: reconcile pass failed: {e}", self.ids[dev as usize]);
                return self.problem(msg);
            }
        };
        for (name, rec) in pass.upserts {
            a.applied.insert(name.as_str().to_string(), rec);
        }
        for name in &pass.removals {
            a.applied.remove(name);
        }
        let mut reports = pass.reports;
        if let Some((desired, applied, failing)) = pass.status {
            a.last_status = (desired, applied, failing);
            reports.push(status_body(desired, applied, failing));
        }
        self.push_reports(dev, reports);
    }

    /// Drains the agent session: events, then frames; handles its end.
    fn agent_pump(&mut self, dev: u32) {
        loop {
            let Some(c) = self.devs[dev as usize].aconn.as_mut() else {
                return;
            };
            let Some(ev) = c.session.poll_event() else {
                break;
            };
            self.agent_event(dev, ev);
        }
        let now = self.now;
        let Some(c) = self.devs[dev as usize].aconn.as_mut() else {
            return;
        };
        let epoch = c.epoch;
        let (frames, done, timer) = drain_io(&mut c.session);
        for f in frames {
            self.send(dev, Dir::ToHub, epoch, f);
        }
        if done {
            return self.agent_conn_lost(dev, epoch);
        }
        if let Some(dl) = timer {
            let at = self.virt(dl).max(now);
            if let Some(c) = self.devs[dev as usize].aconn.as_mut()
                && c.timer_at.is_none_or(|t| at < t)
            {
                c.timer_at = Some(at);
                self.schedule(at, Ev::AgentTimer { dev, epoch });
            }
        }
    }

    fn agent_event(&mut self, dev: u32, ev: AgentEvent) {
        let inst = self.instant(self.now);
        match ev {
            AgentEvent::Welcomed { reports_acked, .. } => {
                let d = &mut self.devs[dev as usize];
                d.backoff.reset();
                if let Some(c) = d.aconn.as_mut()
                    && !c.synced
                {
                    c.synced = true;
                    self.online += 1;
                }
                // The hub holds more than this database numbered (restored from a
                // backup): renumber the queue above the hub's mark.
                let a = &mut d.agent;
                let queued = a.outbox.front().zip(a.outbox.back());
                if let Some(plan) = rebase(
                    reports_acked,
                    a.last_seq,
                    queued.map(|(f, b)| (f.seq, b.seq)),
                ) {
                    for r in a.outbox.iter_mut() {
                        r.seq += plan.shift;
                    }
                    a.last_seq = plan.last_seq;
                    if let Some(c) = d.aconn.as_mut() {
                        c.session.outbox_tail(inst, plan.last_seq);
                    }
                }
            }
            AgentEvent::ReportsAcked { up_to } => {
                let a = &mut self.devs[dev as usize].agent;
                while a.outbox.front().is_some_and(|r| r.seq <= up_to) {
                    a.outbox.pop_front();
                    self.queued -= 1;
                }
            }
            AgentEvent::ReportsWanted { after, limit } => {
                let d = &mut self.devs[dev as usize];
                let batch: Vec<ReportMsg> = d
                    .agent
                    .outbox
                    .iter()
                    .skip_while(|r| r.seq <= after)
                    .take(limit)
                    .cloned()
                    .collect();
                if let Some(c) = d.aconn.as_mut() {
                    c.session.send_reports(inst, batch);
                }
            }
            AgentEvent::StateOffered(update) => self.accept_state(dev, &update),
            AgentEvent::Refused(_)
            | AgentEvent::Failed(_)
            | AgentEvent::Enrolled(_)
            | AgentEvent::Challenged(_) => {
                // The session is done; `agent_pump` handles the end.
            }
        }
    }

    /// The agent's own [`offer`] decision, stored in the model database, and the reply.
    fn accept_state(&mut self, dev: u32, update: &StateUpdate) {
        let d = &mut self.devs[dev as usize];
        let offer = offer(
            update,
            &self.ids[dev as usize],
            d.agent.doc.as_ref(),
            &self.vk,
        );
        let stored = offer.doc.is_some();
        if let Some(doc) = offer.doc {
            d.agent.doc = Some(doc);
        }
        if let Some(c) = d.aconn.as_mut() {
            match offer.reply {
                Reply::Holds(rev) => c.session.state_stored(rev),
                Reply::Unusable { held } => c.session.state_unusable(held),
            }
        }
        if let Some(r) = offer.event {
            self.push_reports(dev, vec![r]);
        }
        if stored {
            self.schedule_pass(dev, self.now);
        }
    }

    // -----------------------------------------------------------------------------------
    // Hub

    fn hub_crash(&mut self) {
        self.hub_up = false;
        self.pending.clear();
        self.commit_at = None;
        for dev in 0..self.devs.len() as u32 {
            let d = &mut self.devs[dev as usize];
            d.hconn = None;
            if let Some(c) = &d.aconn {
                let epoch = c.epoch;
                let notice = self.rng.gen_range(0..=KEEP_ALIVE);
                self.schedule(self.now + notice, Ev::AgentNoticesHubGone { dev, epoch });
            }
        }
    }

    fn hub_start(&mut self) {
        if self.hub_up {
            return;
        }
        self.hub_up = true;
        self.hub_back = self.now;
        for step in std::mem::take(&mut self.deferred) {
            if let Err(e) = self.operator(&step) {
                self.problem(format!("{}: {e:#}", step.describe()));
            }
        }
    }

    fn hub_pump(&mut self, dev: u32) {
        loop {
            let Some(c) = self.devs[dev as usize].hconn.as_mut() else {
                return;
            };
            let Some(ev) = c.session.poll_event() else {
                break;
            };
            self.hub_event(dev, ev);
        }
        let now = self.now;
        let Some(c) = self.devs[dev as usize].hconn.as_mut() else {
            return;
        };
        let epoch = c.epoch;
        let (frames, done, timer) = drain_io(&mut c.session);
        for f in frames {
            self.send(dev, Dir::ToAgent, epoch, f);
        }
        if done {
            return self.hub_drop(dev, epoch);
        }
        if let Some(dl) = timer {
            let at = self.virt(dl).max(now);
            if let Some(c) = self.devs[dev as usize].hconn.as_mut()
                && c.timer_at.is_none_or(|t| at < t)
            {
                c.timer_at = Some(at);
                self.schedule(at, Ev::HubTimer { dev, epoch });
            }
        }
    }

    /// Hands a session event to the hub's [`SyncCore`] and carries out its actions.
    fn hub_event(&mut self, dev: u32, ev: HubEvent) {
        let acked = self.devs[dev as usize].hub.reports_acked;
        let id = self.ids[dev as usize].clone();
        let Some(c) = self.devs[dev as usize].hconn.as_mut() else {
            return;
        };
        match ev {
            HubEvent::SyncRequested { state_revision, .. } => {
                self.report.faults.sessions += 1;
                c.synced = true;
                c.session.accept_sync(id, acked);
                c.core.start(state_revision, false, Gate::Open);
            }
            HubEvent::Reports(reports) => c.core.reports(reports),
            HubEvent::ReportsLost { from, to } => c.core.reports_lost(from, to),
            HubEvent::StateAcked { revision } => c.core.acked(revision),
            HubEvent::ResyncRequested { state_revision } => c.core.resync(state_revision),
            // Devices start enrolled; failures end the session in `hub_pump`.
            HubEvent::EnrollRequested { .. } | HubEvent::Evidence(_) | HubEvent::Failed(_) => {}
        }
        self.hub_drive(dev);
    }

    /// Carries out the hub core's actions against this model's store and the session,
    /// as the endpoint's connection task does against the real ones.
    fn hub_drive(&mut self, dev: u32) {
        loop {
            let Some(c) = self.devs[dev as usize].hconn.as_mut() else {
                return;
            };
            let epoch = c.epoch;
            let Some(action) = c.core.poll_action() else {
                return;
            };
            match action {
                Action::ReadUpdate { holds } => {
                    let u = self.read_update(dev, Some(holds));
                    self.hub_core(dev, |core| core.update_read(u));
                }
                Action::ReadSnapshot => {
                    let u = self.read_update(dev, None);
                    self.hub_core(dev, |core| core.update_read(u));
                }
                Action::Send(u) => {
                    if let Some(c) = self.devs[dev as usize].hconn.as_mut() {
                        c.session.send_state(u);
                    }
                }
                Action::RecordHeld(revision) => {
                    let h = &mut self.devs[dev as usize].hub;
                    h.stored_revision = h.stored_revision.max(revision);
                }
                Action::StoreReports(reports) => {
                    self.pending
                        .push((dev, epoch, PendingWrite::Reports(reports)));
                    self.arm_commit();
                }
                Action::SkipReports { from, to } => {
                    self.pending
                        .push((dev, epoch, PendingWrite::Lost { from, to }));
                    self.arm_commit();
                }
                Action::AckReports(n) => {
                    if let Some(c) = self.devs[dev as usize].hconn.as_mut() {
                        c.session.reports_durable(n);
                    }
                }
                // Devices here are enrolled without attestation and no policy requires
                // it: the gate opens at the start and is never checked again.
                Action::Challenge => {}
                Action::CheckQuarantine => self.hub_core(dev, |core| core.quarantine_checked(true)),
            }
        }
    }

    fn hub_core(&mut self, dev: u32, f: impl FnOnce(&mut SyncCore)) {
        if let Some(c) = self.devs[dev as usize].hconn.as_mut() {
            f(&mut c.core);
        }
    }

    fn arm_commit(&mut self) {
        if self.commit_at.is_none() {
            // With acknowledgements before durability, a slow disk makes the window wide.
            let delay = if self.sabotage == Some(Sabotage::AckBeforeDurable) {
                SABOTAGE_COMMIT_DELAY
            } else {
                COMMIT_DELAY
            };
            let at = self.now + delay;
            self.commit_at = Some(at);
            self.schedule(at, Ev::Commit);
        }
    }

    /// The group commit: `record_reports` / `skip_reports`, then acknowledgements.
    fn commit(&mut self) {
        if self.commit_at != Some(self.now) {
            return;
        }
        self.commit_at = None;
        for (dev, epoch, write) in std::mem::take(&mut self.pending) {
            let acked = match write {
                PendingWrite::Reports(reports) => self.record_reports(dev, reports),
                PendingWrite::Lost { from, to } => {
                    let h = &mut self.devs[dev as usize].hub;
                    if from == h.reports_acked + 1 && to >= from {
                        h.reports_skipped += to - from + 1;
                        h.reports_acked = to;
                    }
                    h.reports_acked
                }
            };
            if let Some(c) = self.devs[dev as usize].hconn.as_mut()
                && c.epoch == epoch
            {
                c.core.reports_stored(acked);
                self.hub_drive(dev);
                self.hub_pump(dev);
            }
        }
    }

    fn record_reports(&mut self, dev: u32, reports: Vec<ReportMsg>) -> u64 {
        let d = &mut self.devs[dev as usize];
        let h = &mut d.hub;
        let mut status_changed = false;
        for r in reports {
            if r.seq <= h.reports_acked {
                continue;
            }
            if r.seq != h.reports_acked + 1 {
                break;
            }
            match r.body {
                ReportBody::Event(e) => {
                    if e.kind == EventKind::DriftCorrected {
                        h.drift_corrected += 1;
                    }
                }
                ReportBody::Upgrade(_) => {}
                ReportBody::Status(s) => {
                    h.applied_revision = s.applied_revision;
                    h.stored_revision = h.stored_revision.max(s.desired_revision);
                    status_changed = true;
                }
            }
            h.reports_acked = r.seq;
            h.reports_stored += 1;
        }
        let acked = h.reports_acked;
        if status_changed {
            self.update_converged(dev);
        }
        acked
    }

    fn update_converged(&mut self, dev: u32) {
        let now = self.now;
        let reference = self.reference(dev as usize);
        let d = &mut self.devs[dev as usize];
        let c = d.hub.applied_revision == d.hub.revision;
        if c == d.converged {
            return;
        }
        d.converged = c;
        if c {
            d.converged_at = now;
            self.converged += 1;
            if let Some(w) = self.wait.as_mut()
                && w.state[dev as usize] == 1
            {
                w.state[dev as usize] = 2;
                w.pending -= 1;
                w.times.push(ms(now.saturating_sub(reference)));
            }
        } else {
            self.converged -= 1;
        }
    }

    /// The store's update for an agent holding `held`, planned by the stores' own
    /// [`UpdatePlan`] over this model's rows.
    fn read_update(&self, dev: u32, held: Option<u64>) -> Option<StateUpdate> {
        let h = &self.devs[dev as usize].hub;
        let signature = h.signature?;
        let plan = UpdatePlan::for_agent(held, h.revision, h.tomb_floor);
        if plan == UpdatePlan::UpToDate {
            return None;
        }
        let base = plan.base();
        let upserts = h
            .resources
            .iter()
            .filter(|r| plan.includes(r.2))
            .map(|&(n, r, _)| {
                (
                    self.names[n as usize].clone(),
                    self.resources[r as usize].clone(),
                )
            })
            .collect();
        let mut removals: Vec<ResourceName> = h
            .tombstones
            .iter()
            .filter(|t| plan.includes_removal(t.1))
            .map(|t| self.names[t.0 as usize].clone())
            .collect();
        removals.sort();
        Some(StateUpdate {
            device: self.ids[dev as usize].clone(),
            base_revision: base,
            revision: h.revision,
            upserts,
            removals,
            signature,
        })
    }

    fn intern_name(&mut self, n: &ResourceName) -> Result<u16> {
        if let Some(i) = self.names.iter().position(|x| x == n) {
            return Ok(u16::try_from(i)?);
        }
        self.names.push(n.clone());
        Ok(u16::try_from(self.names.len() - 1)?)
    }

    fn intern_resource(&mut self, r: &Resource) -> Result<u32> {
        if let Some(i) = self.resources.iter().position(|x| x == r) {
            return Ok(u32::try_from(i)?);
        }
        self.resources.push(r.clone());
        Ok(u32::try_from(self.resources.len() - 1)?)
    }

    /// An operator's `set`/`unset`: the hub's `assign`.
    fn operator(&mut self, step: &Step) -> Result<()> {
        let (selector, name, resource): (&Selector, &ResourceName, Option<Resource>) = match step {
            Step::Set {
                selector,
                resource,
                path,
                content,
            } => (
                &selector.0,
                resource,
                Some(Resource::File(FileResource {
                    path: path.clone(),
                    content: content.as_bytes().to_vec(),
                    mode: 0o644,
                    uid: None,
                    gid: None,
                })),
            ),
            Step::Unset { selector, resource } => (&selector.0, resource, None),
            _ => return Ok(()),
        };
        self.last_action = self.now;
        let target = Target::Selector(selector.clone());
        let key = target.kind_and_key();
        self.assignments
            .retain(|a| !(a.target.kind_and_key() == key && &a.name == name));
        if let Some(resource) = resource {
            self.assignments.push(Assignment {
                order: self.next_order,
                target: target.clone(),
                name: name.clone(),
                resource,
            });
            self.next_order += 1;
        }
        for g in 0..self.groups.len() {
            let grp = &self.groups[g];
            if !target.matches(&grp.rep, &grp.labels) {
                continue;
            }
            let doc = effective(&grp.rep, &grp.labels, &self.assignments);
            if doc.len() > cairn_sync_protocol::state::MAX_RESOURCES {
                bail!("a device would hold more than the resource limit");
            }
            let digest = document_digest(doc.iter().map(|(n, r)| (n, r.hash())));
            let mut ids = Vec::with_capacity(doc.len());
            for (n, r) in &doc {
                ids.push((self.intern_name(n)?, self.intern_resource(r)?));
            }
            for i in 0..self.groups[g].members.len() {
                let dev = self.groups[g].members[i];
                self.recompute(dev, &ids, &digest);
            }
        }
        if self.sabotage == Some(Sabotage::SkipSignatureCheck) && !self.forged {
            self.forged = true;
            self.inject_forgeries();
        }
        Ok(())
    }

    /// The hub's `recompute`: a new signed revision if the effective document changed.
    fn recompute(&mut self, dev: u32, ids: &[(u16, u32)], digest: &DocumentDigest) {
        let h = &self.devs[dev as usize].hub;
        let unchanged = h.resources.len() == ids.len()
            && h.resources.iter().zip(ids).all(|(a, b)| (a.0, a.1) == *b);
        if unchanged {
            return;
        }
        let new_rev = h.revision + 1;
        let resources: Vec<(u16, u32, u64)> = ids
            .iter()
            .map(|&(n, r)| {
                let rev = h
                    .resources
                    .iter()
                    .find(|x| x.0 == n && x.1 == r)
                    .map_or(new_rev, |x| x.2);
                (n, r, rev)
            })
            .collect();
        let removed: Vec<u16> = h
            .resources
            .iter()
            .filter(|x| !ids.iter().any(|y| y.0 == x.0))
            .map(|x| x.0)
            .collect();
        let signature = sign_state(&self.key, &self.ids[dev as usize], new_rev, digest);
        let h = &mut self.devs[dev as usize].hub;
        h.tombstones.retain(|t| !ids.iter().any(|y| y.0 == t.0));
        for n in removed {
            h.tombstones.retain(|t| t.0 != n);
            h.tombstones.push((n, new_rev));
        }
        if let Some(cutoff) = tombstone_cutoff(new_rev) {
            let before = h.tombstones.len();
            h.tombstones.retain(|t| t.1 > cutoff);
            if h.tombstones.len() < before {
                h.tomb_floor = h.tomb_floor.max(cutoff);
            }
        }
        h.resources = resources;
        h.revision = new_rev;
        h.signature = Some(signature);
        self.update_converged(dev);
        if self.devs[dev as usize].hconn.is_some() {
            self.hub_core(dev, SyncCore::state_changed);
            self.hub_drive(dev);
            self.hub_pump(dev);
        }
    }

    /// Sabotage: a man in the middle injects a forged snapshot into every tenth
    /// connected device's stream.
    fn inject_forgeries(&mut self) {
        let attacker = SigningKey::from_bytes(&[0x66; 32]);
        let inst = self.instant(self.now);
        for dev in (0..self.devs.len() as u32).step_by(10) {
            let device = self.ids[dev as usize].clone();
            let revision = self.devs[dev as usize].hub.revision + 1;
            let Ok(path) = Text::new("etc/evil") else {
                return;
            };
            let res = Resource::File(FileResource {
                path,
                content: b"owned\n".to_vec(),
                mode: 0o644,
                uid: None,
                gid: None,
            });
            let Ok(name) = ResourceName::new("evil") else {
                return;
            };
            let digest = document_digest([(&name, res.hash())]);
            let update = StateUpdate {
                device: device.clone(),
                base_revision: None,
                revision,
                upserts: vec![(name, res)],
                removals: vec![],
                signature: sign_state(&attacker, &device, revision, &digest),
            };
            let Ok(bytes) = frame::encode(&HubMessage::State(update), usize::MAX) else {
                continue;
            };
            if let Some(c) = self.devs[dev as usize].aconn.as_mut()
                && c.synced
            {
                c.session.handle_input(inst, &bytes);
                self.agent_pump(dev);
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // Checks

    fn finish(mut self) -> Report {
        let n = self.devs.len();
        let mut problems = Vec::new();
        let mut conv_ok = 0usize;
        let mut reports_ok = 0usize;
        let mut signed_ok = 0usize;
        let mut ev = Events::default();
        for (i, d) in self.devs.iter().enumerate() {
            let id = &self.ids[i];
            let a = &d.agent;
            let h = &d.hub;
            let stored = a.doc.as_ref().map_or(0, |doc| doc.revision);
            let applied = a.last_status.1;
            // Every desired file applied as specified and still so on the box.
            let same_resources = match &a.doc {
                Some(doc) => {
                    doc.resources.len() == a.applied.len()
                        && doc.resources.iter().all(|(n, r)| {
                            let hash = r.hash().0;
                            a.applied.get(n.as_str()).is_some_and(|rec| {
                                rec.hash == hash
                                    && rec.error.is_none()
                                    && a.files.iter().any(|(p, h)| *p == rec.path && *h == hash)
                            })
                        })
                }
                None => a.applied.is_empty(),
            };
            if h.revision == stored && stored == applied && same_resources {
                conv_ok += 1;
            } else {
                problems.push(format!(
                    "{id}: hub desired revision {}, agent stored {stored}, applied {applied}{}",
                    h.revision,
                    if same_resources {
                        ""
                    } else {
                        ", applied files differ from the stored document"
                    }
                ));
            }
            ev.created += a.last_seq;
            ev.delivered += h.reports_stored;
            ev.lost += a.last_seq.saturating_sub(h.reports_stored);
            ev.duplicated += h.reports_duplicated;
            ev.drift_corrected += h.drift_corrected;
            if h.reports_acked == a.last_seq
                && h.reports_stored == a.last_seq
                && h.reports_duplicated == 0
                && a.outbox.is_empty()
            {
                reports_ok += 1;
            } else {
                problems.push(format!(
                    "{id}: hub stored {} reports up to {} ({} declared lost), agent numbered {} ({} still queued)",
                    h.reports_stored,
                    h.reports_acked,
                    h.reports_skipped,
                    a.last_seq,
                    a.outbox.len()
                ));
            }
            let signed = match &a.doc {
                None => true,
                Some(doc) => StateUpdate {
                    device: doc.device.clone(),
                    base_revision: None,
                    revision: doc.revision,
                    upserts: doc
                        .resources
                        .iter()
                        .map(|(n, r)| (n.clone(), r.clone()))
                        .collect(),
                    removals: vec![],
                    signature: doc.signature,
                }
                .apply_to(id, None, &self.vk)
                .is_ok(),
            };
            if signed {
                signed_ok += 1;
            } else {
                problems.push(format!(
                    "{id}: stored revision {stored} does not verify with the hub key"
                ));
            }
        }
        let mut invariants = Vec::new();
        let mut checks = self.scenario.check.clone();
        checks.sort();
        checks.dedup();
        for inv in checks {
            let r = match inv {
                Invariant::AllConverged => {
                    InvariantResult::new(inv, conv_ok == n, format!("{conv_ok} of {n} devices"))
                }
                Invariant::ReportsExactlyOnce => InvariantResult::new(
                    inv,
                    reports_ok == n,
                    format!(
                        "{reports_ok} of {n} devices; {} reports numbered, {} stored, {} lost, {} duplicated",
                        ev.created, ev.delivered, ev.lost, ev.duplicated
                    ),
                ),
                Invariant::SignedStateOnly => {
                    InvariantResult::new(inv, signed_ok == n, format!("{signed_ok} of {n} devices"))
                }
                // The protocol cores run here without attestation or upgrades; real
                // mode checks these.
                Invariant::AllAttested | Invariant::OsCommittedOrRolledBack => continue,
            };
            invariants.push(r);
        }
        for p in problems {
            self.problem(p);
        }
        let total = self.report.wire.to_hub + self.report.wire.from_hub;
        self.report.wire.per_device = total / n as u64;
        self.report.events = ev;
        self.report.invariants = invariants;
        self.report.simulated_secs = self.now as f64 / SEC as f64;
        self.report
    }
}

/// The output side both session machines share.
trait SessionIo {
    fn transmit(&mut self) -> Option<Vec<u8>>;
    fn done(&self) -> bool;
    fn deadline(&self) -> Option<Instant>;
}

impl SessionIo for AgentSession {
    fn transmit(&mut self) -> Option<Vec<u8>> {
        self.poll_transmit()
    }
    fn done(&self) -> bool {
        self.is_done()
    }
    fn deadline(&self) -> Option<Instant> {
        self.poll_timeout()
    }
}

impl SessionIo for HubSession {
    fn transmit(&mut self) -> Option<Vec<u8>> {
        self.poll_transmit()
    }
    fn done(&self) -> bool {
        self.is_done()
    }
    fn deadline(&self) -> Option<Instant> {
        self.poll_timeout()
    }
}

/// A session's frames to send, whether it ended, and its next deadline.
fn drain_io(s: &mut impl SessionIo) -> (Vec<Vec<u8>>, bool, Option<Instant>) {
    let mut frames = Vec::new();
    while let Some(b) = s.transmit() {
        frames.push(b);
    }
    (frames, s.done(), s.deadline())
}
