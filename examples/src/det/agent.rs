//! The agents: start, crash, drift; the outbox; reconcile passes through
//! [`reconcile::pass`]; the session's events carried out with `cairn_agent::sync`.

use super::*;

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

impl Sim<'_> {
    pub(super) fn agent_start(&mut self, dev: u32) {
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

    pub(super) fn agent_crash(&mut self, dev: u32) {
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

    pub(super) fn drift(&mut self, dev: u32, resource: &ResourceName) {
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

    pub(super) fn schedule_pass(&mut self, dev: u32, at: T) {
        let d = &mut self.devs[dev as usize];
        if !d.agent_up || d.pass_at.is_some_and(|p| p <= at) {
            return;
        }
        d.pass_at = Some(at);
        self.schedule(at, Ev::Reconcile { dev });
    }

    /// Appends reports to the outbox (one transaction) and tells the session.
    pub(super) fn push_reports(&mut self, dev: u32, bodies: Vec<ReportBody>) {
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
    pub(super) fn reconcile(&mut self, dev: u32) {
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
    pub(super) fn agent_pump(&mut self, dev: u32) {
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

    pub(super) fn agent_event(&mut self, dev: u32, ev: AgentEvent) {
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
            AgentEvent::Challenged(c) => self.agent_answer(dev, &c),
            AgentEvent::Refused(_) | AgentEvent::Failed(_) | AgentEvent::Enrolled(_) => {
                // The session is done; `agent_pump` handles the end.
            }
        }
    }

    /// The agent's own [`offer`] decision, stored in the model database, and the reply.
    pub(super) fn accept_state(&mut self, dev: u32, update: &StateUpdate) {
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
}
