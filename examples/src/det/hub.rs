//! The hub: crash and restart, its sessions driven through [`SyncCore`], the group
//! commit of reports, the operator's actions and the recompute of desired state.

use super::*;

impl Sim<'_> {
    pub(super) fn hub_crash(&mut self) {
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

    pub(super) fn hub_start(&mut self) {
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

    pub(super) fn hub_pump(&mut self, dev: u32) {
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
    pub(super) fn hub_event(&mut self, dev: u32, ev: HubEvent) {
        let acked = self.devs[dev as usize].hub.reports_acked;
        let attested = self.devs[dev as usize].hub.attest.is_some();
        let id = self.ids[dev as usize].clone();
        let Some(c) = self.devs[dev as usize].hconn.as_mut() else {
            return;
        };
        match ev {
            HubEvent::SyncRequested { state_revision, .. } => {
                self.report.faults.sessions += 1;
                c.synced = true;
                c.session.accept_sync(id, acked);
                c.core.start(state_revision, attested, Gate::Open);
            }
            HubEvent::Reports(reports) => c.core.reports(reports),
            HubEvent::ReportsLost { from, to } => c.core.reports_lost(from, to),
            HubEvent::StateAcked { revision } => c.core.acked(revision),
            HubEvent::ResyncRequested { state_revision } => c.core.resync(state_revision),
            HubEvent::Evidence(ev) => self.hub_evidence(dev, &ev),
            // Devices start enrolled; failures end the session in `hub_pump`.
            HubEvent::EnrollRequested { .. } | HubEvent::Failed(_) => {}
        }
        self.hub_drive(dev);
    }

    /// Carries out the hub core's actions against this model's store and the session,
    /// as the endpoint's connection task does against the real ones.
    pub(super) fn hub_drive(&mut self, dev: u32) {
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
                Action::Challenge => self.hub_challenge(dev),
                Action::CheckQuarantine => {
                    let lifted = self.quarantine_lifted(dev);
                    self.hub_core(dev, |core| core.quarantine_checked(lifted));
                }
            }
        }
    }

    pub(super) fn hub_core(&mut self, dev: u32, f: impl FnOnce(&mut SyncCore)) {
        if let Some(c) = self.devs[dev as usize].hconn.as_mut() {
            f(&mut c.core);
        }
    }

    pub(super) fn arm_commit(&mut self) {
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
    pub(super) fn commit(&mut self) {
        if self.commit_at != Some(self.now) {
            return;
        }
        self.commit_at = None;
        for (dev, epoch, write) in std::mem::take(&mut self.pending) {
            let acked = match write {
                PendingWrite::Reports(reports) => self.record_reports(dev, reports),
                PendingWrite::Lost { from, to } => {
                    let h = &mut self.devs[dev as usize].hub;
                    if let Some(mark) = stream::skip(h.reports_acked, from, to) {
                        h.reports_skipped += mark - h.reports_acked;
                        h.reports_acked = mark;
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

    pub(super) fn record_reports(&mut self, dev: u32, reports: Vec<ReportMsg>) -> u64 {
        let d = &mut self.devs[dev as usize];
        let h = &mut d.hub;
        let mut status_changed = false;
        let (reports, mark) = stream::accept(h.reports_acked, reports);
        for r in reports {
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
            h.reports_stored += 1;
        }
        h.reports_acked = mark;
        let acked = h.reports_acked;
        if status_changed {
            self.update_converged(dev);
        }
        acked
    }

    pub(super) fn update_converged(&mut self, dev: u32) {
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
    pub(super) fn read_update(&self, dev: u32, held: Option<u64>) -> Option<StateUpdate> {
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

    pub(super) fn intern_name(&mut self, n: &ResourceName) -> Result<u16> {
        if let Some(i) = self.names.iter().position(|x| x == n) {
            return Ok(u16::try_from(i)?);
        }
        self.names.push(n.clone());
        Ok(u16::try_from(self.names.len() - 1)?)
    }

    pub(super) fn intern_resource(&mut self, r: &Resource) -> Result<u32> {
        if let Some(i) = self.resources.iter().position(|x| x == r) {
            return Ok(u32::try_from(i)?);
        }
        self.resources.push(r.clone());
        Ok(u32::try_from(self.resources.len() - 1)?)
    }

    /// An operator's `set`/`unset`: the hub's `assign`.
    pub(super) fn operator(&mut self, step: &Step) -> Result<()> {
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
            Step::Accept { selector } => {
                self.accept(selector.as_ref());
                return Ok(());
            }
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
    pub(super) fn recompute(&mut self, dev: u32, ids: &[(u16, u32)], digest: &DocumentDigest) {
        let h = &self.devs[dev as usize].hub;
        // Resources are interned by value: the same id is the same spec.
        let current: BTreeMap<u16, u32> = h.resources.iter().map(|x| (x.0, x.1)).collect();
        let desired: BTreeMap<u16, u32> = ids.iter().copied().collect();
        let Some(diff) = revisions::diff(&current, &desired) else {
            return;
        };
        let new_rev = h.revision + 1;
        let resources: Vec<(u16, u32, u64)> = ids
            .iter()
            .map(|&(n, r)| {
                let rev = if diff.changed.contains(&n) {
                    new_rev
                } else {
                    h.resources
                        .iter()
                        .find(|x| x.0 == n)
                        .map_or(new_rev, |x| x.2)
                };
                (n, r, rev)
            })
            .collect();
        let removed = diff.removed;
        let signature = sign_state(&self.key, &self.ids[dev as usize], new_rev, digest);
        let h = &mut self.devs[dev as usize].hub;
        h.tombstones.retain(|t| !diff.changed.contains(&t.0));
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
    pub(super) fn inject_forgeries(&mut self) {
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
}
