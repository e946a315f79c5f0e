//! Rebooting the box, with an argument for the boot firmware when it takes one.
//!
//! A Raspberry Pi is asked for a one-shot trial boot by `reboot(2)` with
//! `LINUX_REBOOT_CMD_RESTART2` and the argument `"0 tryboot"`: the Raspberry Pi kernel's
//! firmware driver turns it into the firmware's tryboot flag. busybox's `reboot` cannot
//! pass an argument and no safe binding exposes `RESTART2`, so this module makes the
//! call itself: the only unsafe code in the agent.
//!
//! Every kernel logs the argument as it restarts (`reboot: Restarting system with
//! command '0 tryboot'`), which is how the virtual rig's Pi firmware sees the flag.

use std::ffi::CString;

/// Flushes every file system, then restarts the machine, passing `arg` to the restart
/// handlers (the boot firmware) when given. Returns only on failure.
pub fn restart_with(arg: Option<&str>) -> std::io::Error {
    let arg = match arg.map(CString::new).transpose() {
        Ok(a) => a,
        Err(_) => {
            return std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a reboot argument cannot contain a NUL byte",
            );
        }
    };
    rustix::fs::sync();
    let Some(arg) = arg else {
        return match rustix::system::reboot(rustix::system::RebootCommand::Restart) {
            Ok(()) => std::io::Error::other("reboot(2) returned"),
            Err(e) => e.into(),
        };
    };
    // SAFETY: reboot(2) with the two magic numbers, RESTART2 and a pointer to a
    // NUL-terminated string that outlives the call; the kernel copies at most 255
    // bytes of it and the call returns only on failure (EPERM without CAP_SYS_BOOT).
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::syscall(
            libc::SYS_reboot,
            libc::LINUX_REBOOT_MAGIC1,
            libc::LINUX_REBOOT_MAGIC2,
            libc::LINUX_REBOOT_CMD_RESTART2,
            arg.as_ptr(),
        )
    };
    if rc == 0 {
        std::io::Error::other("reboot(2) returned")
    } else {
        std::io::Error::last_os_error()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Refused before anything is synced or restarted. (The call itself is exercised
    /// by the virtual rig's Pi, whose kernel logs the argument it was given.)
    #[test]
    fn an_argument_with_a_nul_byte_is_refused() {
        let e = restart_with(Some("0 tryboot\0"));
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("NUL"), "{e}");
    }
}
