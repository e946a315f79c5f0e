//! The agent-side TPM code against a real TPM emulator: swtpm, started per test on
//! loopback. Quotes our code makes are accepted by our hub-side verifier and by
//! `tpm2_checkquote` (tpm2-tools); a changed PCR or a replayed nonce is refused.
//! Needs the `agent` feature (libtss2) and swtpm; `scripts/test.sh` installs both.
#![cfg(feature = "agent")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_tpm::device::Device;
use cairn_tpm::quote::{AkPublic, QuoteError, verify_quote};

/// A swtpm process with its state in a temporary directory; killed on drop.
struct Swtpm {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Swtpm {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Two consecutive free ports: server and control.
        let port = (0..200)
            .find_map(|_| {
                let p = TcpListener::bind("127.0.0.1:0")
                    .ok()?
                    .local_addr()
                    .ok()?
                    .port();
                (p < u16::MAX && TcpListener::bind(("127.0.0.1", p + 1)).is_ok()).then_some(p)
            })
            .expect("free ports");
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", dir.path().display()))
            .args([
                "--server",
                &format!("type=tcp,port={port},bindaddr=127.0.0.1"),
            ])
            .args([
                "--ctrl",
                &format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1),
            ])
            .args(["--flags", "not-need-init,startup-clear"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("swtpm is installed (scripts/test.sh installs it)");
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "swtpm did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const PCRS: [u32; 9] = [0, 1, 2, 3, 4, 5, 6, 7, 16];

#[test]
fn quotes_from_a_real_tpm_verify_on_the_hub_and_changes_are_caught() {
    let tpm = Swtpm::start();
    let mut dev = Device::open(&tpm.tcti()).unwrap();
    let ak = AkPublic::from_tpm2b_public(dev.ak_public()).unwrap();
    assert!(matches!(ak, AkPublic::EccP256 { .. }));

    let nonce: Vec<u8> = (0u8..32).collect();
    let expected = dev.pcr_values(&PCRS).unwrap();
    let q = dev.quote(&nonce, &PCRS).unwrap();
    let v = verify_quote(&ak, &q.attest, &q.signature, &nonce, &expected).unwrap();
    assert_eq!(v.pcrs, PCRS.to_vec());

    // A replay of this quote against a fresh nonce is refused.
    let fresh: Vec<u8> = (100u8..132).collect();
    assert_eq!(
        verify_quote(&ak, &q.attest, &q.signature, &fresh, &expected),
        Err(QuoteError::NonceMismatch)
    );

    // The box measures something new: the next quote no longer matches the old values,
    // and matches the new ones.
    dev.extend_debug_pcr([7; 32]).unwrap();
    let q2 = dev.quote(&fresh, &PCRS).unwrap();
    assert_eq!(
        verify_quote(&ak, &q2.attest, &q2.signature, &fresh, &expected),
        Err(QuoteError::PcrMismatch)
    );
    let now = dev.pcr_values(&PCRS).unwrap();
    assert_ne!(now[&16], expected[&16]);
    verify_quote(&ak, &q2.attest, &q2.signature, &fresh, &now).unwrap();

    // Independent check: tpm2_checkquote accepts our quote (when tpm2-tools is here).
    if Command::new("tpm2_checkquote")
        .arg("--help")
        .output()
        .is_ok()
    {
        let dir = tempfile::tempdir().unwrap();
        let p = |f: &str| dir.path().join(f);
        std::fs::write(p("ak.pub"), dev.ak_public()).unwrap();
        std::fs::write(p("quote.msg"), &q2.attest).unwrap();
        std::fs::write(p("quote.sig"), &q2.signature).unwrap();
        let checkquote = |nonce: &[u8]| {
            Command::new("tpm2_checkquote")
                .arg("-u")
                .arg(p("ak.pub"))
                .arg("-m")
                .arg(p("quote.msg"))
                .arg("-s")
                .arg(p("quote.sig"))
                .args(["-g", "sha256", "-q", &hex::encode(nonce)])
                .env("TSS2_LOG", "all+NONE")
                .output()
                .unwrap()
        };
        let ok = checkquote(&fresh);
        assert!(
            ok.status.success(),
            "tpm2_checkquote refused our quote: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
        let bad = checkquote(&nonce);
        assert!(
            !bad.status.success(),
            "tpm2_checkquote accepted a wrong nonce"
        );
    }
}

#[test]
fn a_credential_made_by_the_hub_is_recovered_only_by_the_tpm_holding_both_keys() {
    use cairn_tpm::credential::make_credential;
    let tpm = Swtpm::start();
    let mut dev = Device::open(&tpm.tcti()).unwrap();
    let secret = b"hub challenge 0123456789abcdef!!";
    let cred = make_credential(dev.ek_public(), dev.ak_public(), secret).unwrap();
    assert_eq!(
        dev.activate_credential(&cred.blob, &cred.secret).unwrap(),
        secret
    );

    // Another TPM (a cloned identity: same AK public, other EK) cannot recover it, and
    // this TPM cannot recover a credential made for another AK.
    let other_tpm = Swtpm::start();
    let mut other = Device::open(&other_tpm.tcti()).unwrap();
    assert!(other.activate_credential(&cred.blob, &cred.secret).is_err());
    let for_other_ak = make_credential(dev.ek_public(), other.ak_public(), secret).unwrap();
    assert!(
        dev.activate_credential(&for_other_ak.blob, &for_other_ak.secret)
            .is_err()
    );

    // A tampered blob fails the TPM's integrity check.
    let mut bad = cred.blob.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(dev.activate_credential(&bad, &cred.secret).is_err());
}
