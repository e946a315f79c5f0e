//! What a hardware test needs from a box, virtual or real: power, a way to flash
//! it, and its serial console. Everything else goes through the hub, as in
//! production: the boxes have no shell to log in to.

use std::path::{Path, PathBuf};

use anyhow::Result;

/// One box under test.
pub trait Machine {
    fn name(&self) -> &str;
    /// Writes a whole-disk image onto the box's boot medium (the box is off).
    fn flash(&mut self, image: &Path) -> Result<()>;
    fn power_on(&mut self) -> Result<()>;
    /// Cuts power: no shutdown, no flush.
    fn power_off(&mut self) -> Result<()>;
    /// Whether the box is powered; a box that cannot sense it says what it was last
    /// told (on after `power_on`, off after `power_off`).
    fn is_on(&mut self) -> bool;
    /// The file the serial console is captured to.
    fn console_log(&self) -> PathBuf;
    /// Whether the console is captured at all (a NUC without a serial port or
    /// serial-over-LAN has none): checks that read it are then skipped.
    fn has_console(&self) -> bool {
        true
    }
}

/// The last `lines` lines of a machine's console, without terminal escapes.
pub fn console_tail(m: &dyn Machine, lines: usize) -> String {
    let text = console_text(m);
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The whole console log so far, as text without terminal escapes.
pub fn console_text(m: &dyn Machine) -> String {
    let bytes = std::fs::read(m.console_log()).unwrap_or_default();
    strip_escapes(&String::from_utf8_lossy(&bytes))
}

/// `s` without ANSI escape sequences and carriage returns.
pub fn strip_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    while let Some(&n) = chars.peek() {
                        chars.next();
                        if n.is_ascii_alphabetic() || n == '~' {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_stripped() {
        assert_eq!(
            strip_escapes("\u{1b}[2J\u{1b}[01;01Hboot\r\n\u{1b}[1m\u{1b}[31merror:\u{1b}[0m x"),
            "boot\nerror: x"
        );
    }
}
