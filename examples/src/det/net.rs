//! Links and connections: partitions and flaps, ordered delivery with latency, jitter
//! and loss, connection attempts with probes and backoff, idle deaths.

use super::*;

impl Sim<'_> {
    pub(super) fn set_partition(&mut self, dev: u32, instance: u32) {
        let was = self.devs[dev as usize].cut();
        self.devs[dev as usize].partition = instance;
        self.cut_changed(dev, was);
    }

    pub(super) fn set_flap(&mut self, dev: u32, down: bool) {
        let was = self.devs[dev as usize].cut();
        self.devs[dev as usize].flap_down = down;
        self.cut_changed(dev, was);
    }

    pub(super) fn cut_changed(&mut self, dev: u32, was: bool) {
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

    pub(super) fn link(&self, dev: u32, dir: Dir) -> &Link {
        let d = &self.devs[dev as usize];
        match dir {
            Dir::ToHub => &d.up,
            Dir::ToAgent => &d.down,
        }
    }

    pub(super) fn link_mut(&mut self, dev: u32, dir: Dir) -> &mut Link {
        let d = &mut self.devs[dev as usize];
        match dir {
            Dir::ToHub => &mut d.up,
            Dir::ToAgent => &mut d.down,
        }
    }

    /// Schedules delivery of the link's head frame unless already scheduled by then.
    pub(super) fn arm_link(&mut self, dev: u32, dir: Dir) {
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

    pub(super) fn send(&mut self, dev: u32, dir: Dir, epoch: u32, bytes: Vec<u8>) {
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

    pub(super) fn deliver(&mut self, dev: u32, dir: Dir) {
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

    pub(super) fn reachable(&self, dev: u32) -> bool {
        self.hub_up && !self.devs[dev as usize].cut()
    }

    pub(super) fn attempt_current(&self, dev: u32, attempt: u32) -> bool {
        let d = &self.devs[dev as usize];
        d.agent_up && d.attempt == attempt && d.aconn.is_none()
    }

    pub(super) fn attempt(&mut self, dev: u32, attempt: u32) {
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

    pub(super) fn probe(&mut self, dev: u32, attempt: u32, k: usize) {
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
    pub(super) fn backoff_delay(&mut self, dev: u32) -> T {
        ns(self.devs[dev as usize]
            .backoff
            .next_delay_with(&mut self.rng))
    }

    pub(super) fn attempt_failed(&mut self, dev: u32) {
        let delay = self.backoff_delay(dev);
        let d = &mut self.devs[dev as usize];
        d.attempt += 1;
        let attempt = d.attempt;
        self.schedule(self.now + delay, Ev::Attempt { dev, attempt });
    }

    pub(super) fn established(&mut self, dev: u32, attempt: u32) {
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
        let exporter: [u8; 32] = self.rng.r#gen();
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
            exporter,
            challenge: None,
            synced: false,
            timer_at: None,
        }));
        d.aconn = Some(Box::new(AgentConn {
            epoch,
            session,
            exporter,
            synced: false,
            timer_at: None,
        }));
        self.agent_pump(dev);
        self.hub_pump(dev);
    }

    /// The agent's connection `epoch` is gone: reconnect after a backoff.
    pub(super) fn agent_conn_lost(&mut self, dev: u32, epoch: u32) {
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

    pub(super) fn hub_drop(&mut self, dev: u32, epoch: u32) {
        let d = &mut self.devs[dev as usize];
        if d.hconn.as_ref().is_some_and(|c| c.epoch == epoch) {
            d.hconn = None;
        }
    }
}
