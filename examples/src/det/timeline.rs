//! The scenario's timeline: warm-up, steps, convergence waits, the end of faults.

use super::*;

impl Sim<'_> {
    pub(super) fn warm_up(&mut self) {
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

    pub(super) fn step(&mut self, index: usize, step: &Step) -> Result<()> {
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
            Step::Tamper { devices, selector } => {
                let picked = sc.pick(index, *devices, selector.as_ref());
                self.report.faults.tampered += picked.len() as u64;
                for d in picked {
                    self.tamper(d as u32);
                }
            }
            Step::Accept { selector } => {
                if self.hub_up {
                    self.accept(selector.as_ref());
                } else {
                    self.deferred.push(step.clone());
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
    pub(super) fn reference(&self, dev: usize) -> T {
        self.last_action
            .max(self.hub_back)
            .max(self.devs[dev].fault_end)
    }

    pub(super) fn converge(&mut self, name: &str, timeout: T) {
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

    pub(super) fn end_faults(&mut self) {
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

    pub(super) fn drain(&mut self) {
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

    pub(super) fn heal(&mut self) {
        for d in 0..self.devs.len() as u32 {
            if self.devs[d as usize].partition != 0 {
                self.set_partition(d, 0);
            }
        }
    }

    pub(super) fn flap_toggle(&mut self, flap: usize, n: u64) {
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
}
