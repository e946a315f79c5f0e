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
use cairn_hub::evidence::PendingChallenge;
use cairn_hub::store::AttestRecord;
use cairn_hub::store::revisions::{self, UpdatePlan, tombstone_cutoff};
use cairn_hub::store::stream;
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
use cairn_tpm::soft::SoftTpm;
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

struct AgentConn {
    epoch: u32,
    session: AgentSession,
    /// The TLS exporter of the connection (random per connection, both ends know it).
    exporter: [u8; 32],
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
    drift_corrected: u64,
    /// The attestation record (attested scenarios).
    attest: Option<Box<AttestRecord>>,
}

struct HubConn {
    epoch: u32,
    session: HubSession,
    /// The hub's decisions for this session (the endpoint's own core).
    core: SyncCore,
    exporter: [u8; 32],
    /// The challenge waiting for evidence.
    challenge: Option<PendingChallenge>,
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
    /// The box's TPM (attested scenarios): hardware, it survives agent crashes.
    tpm: Option<Box<SoftTpm>>,
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
    /// `hub.quarantined` events the store would have recorded.
    quarantined: u64,
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
                tpm: None,
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
        let mut sim = Sim {
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
            quarantined: 0,
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
        };
        if scenario.attest {
            sim.enroll_attested()?;
        }
        Ok(sim)
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

mod agent;
mod attest;
mod check;
mod hub;
mod net;
mod timeline;
