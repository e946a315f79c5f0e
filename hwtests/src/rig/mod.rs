//! The real rig: the hardware scenario ([`crate::scenario`]) on real boxes on the rig
//! host's LAN.
//!
//! - [`config`] reads `rig.toml` (`rig/rig.example.toml` documents it).
//! - [`RealBox`] is a [`Machine`] made from one `[[box]]`: [`console`] captures its
//!   serial console, [`power`] switches it, [`flash`] writes its boot medium.
//! - [`check`] probes a rig without switching or writing anything; [`report`] is the
//!   combined report `cairn-rig run` writes.

pub mod check;
pub mod config;
pub mod console;
pub mod flash;
pub mod power;
pub mod report;
pub mod serial;
pub mod shell;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::machine::Machine;
use config::{BoxConfig, ConsoleConfig};
use console::{Console, ConsoleSource};
use flash::Flasher;
use power::Power;

/// One real box: power, flashing and console as its `[[box]]` says.
pub struct RealBox {
    name: String,
    log: PathBuf,
    console: Option<Console>,
    power: Power,
    flasher: Flasher,
    /// The last state commanded; `None` before the first.
    powered: Option<bool>,
}

impl RealBox {
    /// The box `cfg` with its console log in `dir/console.log`.
    pub fn from_config(cfg: &BoxConfig, dir: &Path) -> Result<RealBox> {
        let power = Power::from_config(&cfg.name, &cfg.power)?;
        let flasher = Flasher::from_config(&cfg.flash);
        let console = cfg.console.as_ref().map(|c| match c {
            ConsoleConfig::Serial { device, baud } => ConsoleSource::Serial {
                device: device.clone(),
                baud: *baud,
            },
            ConsoleConfig::Command { command } => ConsoleSource::Command {
                command: command.clone(),
            },
        });
        RealBox::new(&cfg.name, dir, console, power, flasher)
    }

    /// A box from its parts; creates `dir` and the console log.
    pub fn new(
        name: &str,
        dir: &Path,
        console: Option<ConsoleSource>,
        power: Power,
        flasher: Flasher,
    ) -> Result<RealBox> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let log = dir.join("console.log");
        let console = console.map(|s| Console::new(s, &log));
        match &console {
            Some(c) => console::mark(&log, &format!("console of {name}: {}", c.source())),
            None => console::mark(
                &log,
                &format!("{name} has no console configured: nothing of it is captured"),
            ),
        }
        Ok(RealBox {
            name: name.to_string(),
            log,
            console,
            power,
            flasher,
            powered: None,
        })
    }

    fn mark(&self, text: &str) {
        console::mark(&self.log, text);
    }

    /// Starts the console capture (also before the first power-on, to watch a box that
    /// is on already).
    pub fn start_console(&mut self) -> Result<()> {
        match &mut self.console {
            Some(c) => c.start(),
            None => Ok(()),
        }
    }

    /// Stops the console capture (it starts again with the next power-on).
    pub fn stop_console(&mut self) {
        if let Some(c) = &mut self.console {
            c.stop();
        }
    }

    pub fn power_control(&self) -> &Power {
        &self.power
    }

    pub fn flasher(&self) -> &Flasher {
        &self.flasher
    }

    /// Switches the power, marking it in the console log; while the switch is under
    /// way the power state counts as unknown.
    fn switch(&mut self, on: bool) -> Result<()> {
        let word = if on { "on" } else { "off" };
        self.mark(&format!("power {word} ({})", self.power.describe()));
        self.powered = None;
        self.power
            .set(on)
            .with_context(|| format!("powering {word} {}", self.name))?;
        self.powered = Some(on);
        tracing::info!(r#box = %self.name, "power {word}");
        Ok(())
    }
}

impl Machine for RealBox {
    fn name(&self) -> &str {
        &self.name
    }

    fn flash(&mut self, image: &Path) -> Result<()> {
        if self.powered != Some(false) {
            self.power_off().context("powering off before flashing")?;
        }
        self.mark(&format!(
            "flashing {} with {}",
            image.display(),
            self.flasher.describe()
        ));
        self.flasher
            .flash(image, &self.name)
            .with_context(|| format!("flashing {}", self.name))?;
        self.mark("flashed");
        Ok(())
    }

    fn power_on(&mut self) -> Result<()> {
        self.start_console()?;
        self.switch(true)
    }

    fn power_off(&mut self) -> Result<()> {
        self.switch(false)
    }

    /// The last state commanded (off before the first command).
    fn is_on(&mut self) -> bool {
        self.powered == Some(true)
    }

    fn console_log(&self) -> PathBuf {
        self.log.clone()
    }

    fn has_console(&self) -> bool {
        self.console.is_some()
    }
}
