//! Deliberate bugs, switched on per thread, to show that the deterministic simulator's
//! invariant checks catch a broken core.
//!
//! The switches sit inside the real decision code (the signature check in
//! [`crate::state::StateUpdate::apply_to`], the hub's report acknowledgement in
//! `cairn_hub::sync`), so a simulation run with one on exercises the code that ships
//! with one line changed, not a copy of it. They exist only with the `sabotage` feature,
//! which only test builds turn on: without it [`active`] is the constant `false`, the
//! checks compile away and [`set`] refuses.
//!
//! Per thread, because the simulator runs on one thread and tests run in parallel.

/// A deliberate bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sabotage {
    /// The hub acknowledges reports as soon as they arrive, before they are durable: a
    /// hub crash then loses reports the agents already deleted.
    AckBeforeDurable,
    /// Agents skip the signature check of desired-state updates.
    SkipSignatureCheck,
}

#[cfg(feature = "sabotage")]
thread_local! {
    static ON: std::cell::Cell<Option<Sabotage>> = const { std::cell::Cell::new(None) };
}

/// Switches `s` on (or every switch off, with `None`) for this thread. Fails in a build
/// without the `sabotage` feature, where the switches do not exist.
pub fn set(s: Option<Sabotage>) -> Result<(), &'static str> {
    #[cfg(feature = "sabotage")]
    {
        ON.with(|on| on.set(s));
        Ok(())
    }
    #[cfg(not(feature = "sabotage"))]
    match s {
        None => Ok(()),
        Some(_) => Err(
            "this build has no sabotage switches (build with the `sabotage` feature of cairn-sync-protocol)",
        ),
    }
}

/// Whether `s` is switched on for this thread.
#[inline]
pub fn active(s: Sabotage) -> bool {
    #[cfg(feature = "sabotage")]
    {
        ON.with(|on| on.get() == Some(s))
    }
    #[cfg(not(feature = "sabotage"))]
    {
        let _ = s;
        false
    }
}
