//! Real TPMs for tests (feature `testkit`): swtpm instances provisioned like a
//! manufacturer would, each in its own temporary directory, with EK certificates from a
//! per-test CA. No mocks: the agent code under test talks TPM 2.0 to libtpms.
//!
//! - [`TestCa`]: a two-level CA (root, issuing CA) made by swtpm's own `swtpm_localca`
//!   in a temporary directory. Share one between TPMs to make them "the same
//!   manufacturer"; make another to play an untrusted one.
//! - [`Swtpm::start`]: `swtpm_setup` with our own configuration (nothing is written to
//!   `/var/lib/swtpm-localca`), then `swtpm socket` on a free loopback port pair; killed
//!   on drop. [`Swtpm::restart`] is a reboot: same state, PCRs reset.
//! - [`measure_boot`]: plays firmware, extending a real event log into the PCRs.
//!
//! swtpm 0.7's `swtpm_setup` certifies an RSA-2048 EK (NV `0x01c00002`) and an ECC
//! **P-384** EK (`0x01c00016`), but not the P-256 EK of the low range. For
//! [`EkCert::Ecc`] the kit adds one: it creates the P-256 EK from the TCG template, has
//! the CA certify it, and writes the certificate to NV `0x01c0000a` under the platform
//! hierarchy with the attributes `swtpm_setup` uses, as a manufacturer would.
//!
//! Needs `swtpm`, `swtpm_setup`, `swtpm_localca` (Debian: swtpm, swtpm-tools) on PATH.

use std::fs::File;
use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tss_esapi::Context;
use tss_esapi::abstraction::nv::NvOpenOptions;
use tss_esapi::abstraction::{DefaultKey, ek};
use tss_esapi::attributes::NvIndexAttributesBuilder;
use tss_esapi::handles::NvIndexTpmHandle;
use tss_esapi::interface_types::algorithm::{AsymmetricAlgorithm, HashingAlgorithm};
use tss_esapi::interface_types::resource_handles::NvAuth;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::NvPublicBuilder;
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::Marshall;

use crate::device::{self, DeviceError, ECC_EK_CERT_INDEX};
use cairn_tpm::ekcert::{EkCertError, EkTrust};
use cairn_tpm::eventlog::{self, EventLogError, alg, event_type};
use cairn_tpm::quote::AkPublic;

/// How long a swtpm may take to listen, and a tool to finish.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How many port pairs to try when another process takes the one picked.
const PORT_ATTEMPTS: usize = 20;

/// What failed in the kit, with the command or file involved.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {output}")]
    Tool {
        command: String,
        status: String,
        output: String,
    },
    #[error("{0}")]
    Start(String),
    #[error("TPM {step}: {source}")]
    Tpm {
        step: &'static str,
        #[source]
        source: tss_esapi::Error,
    },
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("event log: {0}")]
    EventLog(#[from] EventLogError),
    #[error("CA certificate: {0}")]
    Ca(#[from] EkCertError),
    #[error("{0}")]
    Unsupported(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TestkitError {
    let what = what.into();
    move |source| TestkitError::Io { what, source }
}

fn tpm(step: &'static str) -> impl FnOnce(tss_esapi::Error) -> TestkitError {
    move |source| TestkitError::Tpm { step, source }
}

/// Runs a tool to completion; its output goes into the error if it fails.
fn run(cmd: &mut Command) -> Result<(), TestkitError> {
    let command = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(io(format!("running {command} (is swtpm-tools installed?)")))?;
    if out.status.success() {
        return Ok(());
    }
    Err(TestkitError::Tool {
        command,
        status: out.status.to_string(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    })
}

fn find_on_path(name: &str) -> Result<PathBuf, TestkitError> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| TestkitError::Start(format!("{name} is not on PATH (install swtpm-tools)")))
}

/// The TPM identity `swtpm_localca` writes into EK certificates (subjectAltName).
const TPM_IDENTITY: [&str; 12] = [
    "--tpm-spec-family",
    "2.0",
    "--tpm-spec-level",
    "0",
    "--tpm-spec-revision",
    "164",
    "--tpm-manufacturer",
    "id:00001014",
    "--tpm-model",
    "swtpm",
    "--tpm-version",
    "id:20191023",
];

/// A certificate authority for EK certificates: a self-signed root and an issuing CA
/// under it (RSA-3072, as `swtpm_localca` makes them), in a temporary directory that
/// lives as long as any clone. Every `TestCa::new()` is a different CA, though all have
/// the same names (`swtpm-localca-rootca`, `swtpm-localca`): a verifier must tell them
/// apart by their keys.
#[derive(Debug, Clone)]
pub struct TestCa {
    dir: Arc<tempfile::TempDir>,
}

impl TestCa {
    /// Makes a new CA (about half a second: two RSA-3072 keys).
    pub fn new() -> Result<Self, TestkitError> {
        let dir = tempfile::Builder::new()
            .prefix("cairn-test-ca-")
            .tempdir()
            .map_err(io("creating the CA directory"))?;
        let d = dir.path();
        let conf = format!(
            "statedir = {0}\nsigningkey = {0}/signkey.pem\nissuercert = {0}/issuercert.pem\n\
             certserial = {0}/certserial\n",
            d.display()
        );
        std::fs::write(d.join("localca.conf"), conf).map_err(io("writing localca.conf"))?;
        std::fs::write(
            d.join("localca.options"),
            "--platform-manufacturer Cairn\n--platform-version 2.1\n--platform-model swtpm\n",
        )
        .map_err(io("writing localca.options"))?;
        let ca = Self { dir: Arc::new(dir) };
        // swtpm_localca makes its root and issuing CA on first use; certifying a
        // throw-away RSA key gets that done now, before any TPM needs it.
        let dummy_modulus = "c5".repeat(256);
        ca.certify(&["--ek", &dummy_modulus])?;
        Ok(ca)
    }

    /// The CA's directory (keys, certificates, swtpm_localca configuration).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Path of the issuing CA's certificate: the one that signs EK certificates.
    pub fn issuer_cert_path(&self) -> PathBuf {
        self.dir().join("issuercert.pem")
    }

    /// Path of the self-signed root certificate.
    pub fn root_cert_path(&self) -> PathBuf {
        self.dir().join("swtpm-localca-rootca-cert.pem")
    }

    /// The issuing CA and the root, PEM: what an operator would put in the hub's EK
    /// trust store for this "manufacturer".
    pub fn ca_cert_pem(&self) -> Result<Vec<u8>, TestkitError> {
        let mut pem =
            std::fs::read(self.issuer_cert_path()).map_err(io("reading issuercert.pem"))?;
        pem.extend(
            std::fs::read(self.root_cert_path()).map_err(io("reading the root certificate"))?,
        );
        Ok(pem)
    }

    /// [`TestCa::ca_cert_pem`] as a trust store.
    pub fn trust(&self) -> Result<EkTrust, TestkitError> {
        Ok(EkTrust::from_pem(&self.ca_cert_pem()?)?)
    }

    /// Has `swtpm_localca` certify the EK described by `ek_args` (`--ek ...`); returns
    /// the certificate (DER).
    fn certify(&self, ek_args: &[&str]) -> Result<Vec<u8>, TestkitError> {
        let out = tempfile::tempdir().map_err(io("creating a certificate directory"))?;
        run(Command::new(find_on_path("swtpm_localca")?)
            .args(["--type", "ek"])
            .args(ek_args)
            .arg("--dir")
            .arg(out.path())
            .args(TPM_IDENTITY)
            .arg("--tpm2")
            .arg("--configfile")
            .arg(self.dir().join("localca.conf"))
            .arg("--optsfile")
            .arg(self.dir().join("localca.options")))?;
        std::fs::read(out.path().join("ek.cert")).map_err(io("reading the EK certificate"))
    }
}

/// Which EK certificates a [`Swtpm`] is provisioned with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EkCert {
    /// An ECC P-256 EK certificate (NV `0x01c0000a`), plus swtpm_setup's RSA-2048 and
    /// P-384 ones: [`device::Device::open`] picks the ECC EK.
    #[default]
    Ecc,
    /// Only swtpm_setup's RSA-2048 (and P-384) EK certificates: the RSA EK is picked.
    Rsa,
    /// No EK certificate at all (a TPM whose maker provisioned none).
    None,
}

/// How to provision a [`Swtpm`].
#[derive(Debug, Clone, Default)]
pub struct SwtpmOptions {
    pub ek_cert: EkCert,
    /// The CA that signs the EK certificates; `None`: a new one for this TPM.
    pub ca: Option<TestCa>,
}

/// A provisioned swtpm listening on loopback; killed on drop.
#[derive(Debug)]
pub struct Swtpm {
    child: Child,
    port: u16,
    ca: Option<TestCa>,
    dir: tempfile::TempDir,
}

impl Swtpm {
    /// Provisions a fresh TPM (see [`SwtpmOptions`]) and starts it.
    pub fn start(opts: SwtpmOptions) -> Result<Self, TestkitError> {
        let dir = tempfile::Builder::new()
            .prefix("cairn-swtpm-")
            .tempdir()
            .map_err(io("creating the swtpm directory"))?;
        let state = dir.path().join("state");
        std::fs::create_dir(&state).map_err(io("creating the state directory"))?;
        let ca = match (opts.ek_cert, opts.ca) {
            (EkCert::None, _) => None,
            (_, Some(ca)) => Some(ca),
            (_, None) => Some(TestCa::new()?),
        };

        let mut setup = Command::new("swtpm_setup");
        setup
            .args(["--tpm2", "--pcr-banks", "sha256", "--tpmstate"])
            .arg(&state);
        if let Some(ca) = &ca {
            let conf = dir.path().join("swtpm_setup.conf");
            std::fs::write(
                &conf,
                format!(
                    "create_certs_tool = {}\ncreate_certs_tool_config = {}\n\
                     create_certs_tool_options = {}\nactive_pcr_banks = sha256\n",
                    find_on_path("swtpm_localca")?.display(),
                    ca.dir().join("localca.conf").display(),
                    ca.dir().join("localca.options").display()
                ),
            )
            .map_err(io("writing swtpm_setup.conf"))?;
            setup
                .arg("--config")
                .arg(&conf)
                .args(["--create-ek-cert", "--create-platform-cert"]);
        } else {
            // An empty configuration: no certificate tool, and nothing read from /etc.
            let conf = dir.path().join("swtpm_setup.conf");
            std::fs::write(&conf, "active_pcr_banks = sha256\n")
                .map_err(io("writing swtpm_setup.conf"))?;
            setup.arg("--config").arg(&conf);
        }
        run(&mut setup)?;

        let (child, port) = spawn(dir.path())?;
        let tpm = Self {
            child,
            port,
            ca,
            dir,
        };
        if opts.ek_cert == EkCert::Ecc {
            tpm.add_ecc_ek_certificate()?;
        }
        Ok(tpm)
    }

    /// The TCTI string for tss-esapi / tpm2-tools. Only one client at a time: swtpm has
    /// no resource manager.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The TPM's state directory (`tpm2-00.permall`).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The CA that signed this TPM's EK certificates (`None` with [`EkCert::None`]).
    pub fn ca(&self) -> Option<&TestCa> {
        self.ca.as_ref()
    }

    /// Path of the CA certificate that signed the EK certificates.
    pub fn ca_cert_path(&self) -> Option<PathBuf> {
        self.ca.as_ref().map(TestCa::issuer_cert_path)
    }

    /// The CA chain (issuing CA and root, PEM) of the EK certificates; empty without.
    pub fn ca_cert_pem(&self) -> Result<Vec<u8>, TestkitError> {
        match &self.ca {
            Some(ca) => ca.ca_cert_pem(),
            None => Ok(Vec::new()),
        }
    }

    /// A reboot: kills swtpm (SIGKILL, as a power cut) and starts it again on the same
    /// state. PCRs and loaded objects are gone, NV and persistent objects stay. Close
    /// any `Device` first, and reopen after; [`Swtpm::tcti`] may name another port.
    pub fn restart(&mut self) -> Result<(), TestkitError> {
        let _ = self.child.kill();
        self.child
            .wait()
            .map_err(io("waiting for the killed swtpm"))?;
        let (child, port) = spawn_on(self.dir.path(), Some(self.port))?;
        self.child = child;
        self.port = port;
        Ok(())
    }

    /// Stops swtpm and hands over its provisioned directory (`state/` holds the TPM:
    /// EK certificates in NV) and CA, for a TPM another program serves — QEMU's
    /// `-tpmdev emulator` over a swtpm of its own.
    pub fn into_state(mut self) -> Result<(tempfile::TempDir, Option<TestCa>), TestkitError> {
        let spare = tempfile::tempdir().map_err(io("creating a directory"))?;
        let _ = self.child.kill();
        self.child.wait().map_err(io("waiting for swtpm"))?;
        let dir = std::mem::replace(&mut self.dir, spare);
        Ok((dir, self.ca.take()))
    }

    fn add_ecc_ek_certificate(&self) -> Result<(), TestkitError> {
        let ca = self
            .ca
            .as_ref()
            .ok_or_else(|| TestkitError::Start("an ECC EK certificate needs a CA".into()))?;
        let mut ctx = context(&self.tcti())?;
        let ek = ek::create_ek_object(&mut ctx, AsymmetricAlgorithm::Ecc, DefaultKey)
            .map_err(tpm("creating the ECC EK"))?;
        let public = ctx.read_public(ek).map_err(tpm("reading the ECC EK"));
        ctx.flush_context(ek.into())
            .map_err(tpm("flushing the ECC EK"))?;
        let mut tpm2b = Vec::new();
        let body = public?.0.marshall().map_err(tpm("encoding the ECC EK"))?;
        tpm2b.extend(u16::try_from(body.len()).unwrap_or(u16::MAX).to_be_bytes());
        tpm2b.extend(body);
        let Ok(AkPublic::EccP256 { point }) = AkPublic::from_tpm2b_public(&tpm2b) else {
            return Err(TestkitError::Start("the ECC EK is not a P-256 key".into()));
        };
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let ek_arg = format!(
            "x={},y={},id=secp256r1",
            hex(&point[1..33]),
            hex(&point[33..65])
        );
        let cert = ca.certify(&["--ek", &ek_arg])?;

        let attributes = NvIndexAttributesBuilder::new()
            .with_pp_write(true)
            .with_write_define(true)
            .with_pp_read(true)
            .with_owner_read(true)
            .with_auth_read(true)
            .with_no_da(true)
            .with_platform_create(true)
            .build()
            .map_err(tpm("NV attributes"))?;
        let index = NvIndexTpmHandle::new(ECC_EK_CERT_INDEX).map_err(tpm("NV index"))?;
        let nv_public = NvPublicBuilder::new()
            .with_nv_index(index)
            .with_index_name_algorithm(HashingAlgorithm::Sha256)
            .with_index_attributes(attributes)
            .with_data_area_size(cert.len())
            .build()
            .map_err(tpm("NV public area"))?;
        ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
            let mut nv = NvOpenOptions::NewIndex {
                nv_public,
                auth_handle: NvAuth::Platform,
            }
            .open(ctx)?;
            nv.write_all(&cert).map_err(|_| {
                tss_esapi::Error::WrapperError(tss_esapi::WrapperErrorKind::InvalidParam)
            })
        })
        .map_err(tpm("writing the ECC EK certificate to NV"))
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn context(tcti: &str) -> Result<Context, TestkitError> {
    let conf = TctiNameConf::from_str(tcti).map_err(tpm("parsing the TCTI"))?;
    Context::new(conf).map_err(tpm("connecting"))
}

fn spawn(dir: &Path) -> Result<(Child, u16), TestkitError> {
    spawn_on(dir, None)
}

/// Starts swtpm on `preferred` (and the next port, for control) or on a free pair.
///
/// Ports are picked by binding port 0, then released for swtpm: another process may take
/// them in between. swtpm then fails to bind and exits without writing its pid file, so
/// "the pid file holds our child's pid" means it owns both ports; until then it is not
/// connected to (the port might be someone else's).
fn spawn_on(dir: &Path, preferred: Option<u16>) -> Result<(Child, u16), TestkitError> {
    let mut last_error = String::new();
    for attempt in 0..PORT_ATTEMPTS {
        let port = match (attempt, preferred) {
            (0, Some(p)) => p,
            _ => free_port_pair()?,
        };
        let pid_file = dir.join("swtpm.pid");
        let _ = std::fs::remove_file(&pid_file);
        let log = File::create(dir.join("swtpm.log")).map_err(io("creating swtpm.log"))?;
        let mut child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", dir.join("state").display()))
            .args([
                "--server",
                &format!("type=tcp,port={port},bindaddr=127.0.0.1"),
            ])
            .args([
                "--ctrl",
                &format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1),
            ])
            .args(["--flags", "not-need-init,startup-clear"])
            .arg("--pid")
            .arg(format!("file={}", pid_file.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(io("starting swtpm (is swtpm installed?)"))?;
        let deadline = Instant::now() + START_TIMEOUT;
        let ready = loop {
            if let Some(status) = child.try_wait().map_err(io("watching swtpm"))? {
                last_error = format!(
                    "swtpm exited ({status}): {}",
                    std::fs::read_to_string(dir.join("swtpm.log")).unwrap_or_default()
                );
                break false;
            }
            let ours = std::fs::read_to_string(&pid_file)
                .is_ok_and(|pid| pid.trim() == child.id().to_string());
            if ours && TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break true;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(TestkitError::Start(format!(
                    "swtpm did not listen on port {port} within {START_TIMEOUT:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if ready {
            return Ok((child, port));
        }
    }
    Err(TestkitError::Start(format!(
        "swtpm did not start after {PORT_ATTEMPTS} port pairs; last: {last_error}"
    )))
}

/// Two consecutive free loopback ports (server, control).
fn free_port_pair() -> Result<u16, TestkitError> {
    for _ in 0..200 {
        let server = TcpListener::bind("127.0.0.1:0").map_err(io("binding a loopback port"))?;
        let port = server
            .local_addr()
            .map_err(io("reading the bound port"))?
            .port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return Ok(port);
        }
    }
    Err(TestkitError::Start(
        "no two consecutive free loopback ports".into(),
    ))
}

/// Plays firmware on the TPM at `tcti`: extends every event of the crypto-agile log
/// `eventlog` (except no-action events) into its PCR's sha256 bank, so the TPM ends with
/// the PCRs of the boot the log records. Run on a freshly started (or restarted) swtpm,
/// with no other client connected. A log whose firmware started at a locality other
/// than 0 (PCR 0 starting at …03) cannot be replayed here and is refused.
pub fn measure_boot(tcti: &str, eventlog: &[u8]) -> Result<(), TestkitError> {
    let log = eventlog::parse(eventlog)?;
    if let Some(locality) = log.startup_locality.filter(|l| *l != 0) {
        return Err(TestkitError::Unsupported(format!(
            "the log's firmware started at locality {locality}; swtpm starts at locality 0"
        )));
    }
    let mut ctx = context(tcti)?;
    for (n, event) in log.events.iter().enumerate() {
        if event.event_type == event_type::EV_NO_ACTION {
            continue;
        }
        let digest: [u8; 32] = event
            .digest(alg::SHA256)
            .and_then(|d| d.try_into().ok())
            .ok_or_else(|| TestkitError::Unsupported(format!("event {n} has no sha256 digest")))?;
        device::extend_pcr(&mut ctx, event.pcr, digest)?;
    }
    Ok(())
}

/// Plays IMA for `files` (path, content): appends one `ima-ng` entry per file to the
/// sha256 per-bank measurement list at `list` (created if missing) and extends PCR 10
/// of the TPM at `tcti` with the entry's template digest, as the kernel does (entry
/// listed first, PCR extended after).
pub fn measure_files(tcti: &str, list: &Path, files: &[(&str, &[u8])]) -> Result<(), TestkitError> {
    use sha2::{Digest, Sha256};
    use std::io::Write;
    fn field(out: &mut Vec<u8>, v: &[u8]) {
        out.extend((v.len() as u32).to_le_bytes());
        out.extend_from_slice(v);
    }
    let mut ctx = context(tcti)?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(list)
        .map_err(io("opening the IMA list"))?;
    for (path, content) in files {
        let mut d_ng = b"sha256:\0".to_vec();
        d_ng.extend(Sha256::digest(content));
        let mut n_ng = path.as_bytes().to_vec();
        n_ng.push(0);
        let mut data = Vec::new();
        field(&mut data, &d_ng);
        field(&mut data, &n_ng);
        let digest: [u8; 32] = Sha256::digest(&data).into();
        let mut entry = cairn_tpm::ima::IMA_PCR.to_le_bytes().to_vec();
        entry.extend(digest);
        field(&mut entry, b"ima-ng");
        field(&mut entry, &data);
        file.write_all(&entry).map_err(io("writing the IMA list"))?;
        device::extend_pcr(&mut ctx, cairn_tpm::ima::IMA_PCR, digest)?;
    }
    file.sync_all().map_err(io("syncing the IMA list"))
}
