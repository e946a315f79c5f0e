//! `cairn-hub serve`: keys, store, the agents' QUIC endpoint and the admin API, wired
//! together. Also used in-process by the fleet simulation and tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use cairn_sync_protocol::SessionConfig;
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::api::{self, Api};
use crate::endpoint::{self, EndpointConfig, Registry, Shared};
use crate::pki::HubKeys;
use crate::store::sqlite::SqliteStore;
use crate::store::{DynStore, StateSigner};

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Extra DNS names / IPs for the hub certificate (how operators reach the admin API).
    pub names: Vec<String>,
    pub idle_timeout: Duration,
    pub session: SessionConfig,
    pub attest: crate::attest::AttestConfig,
}

impl HubConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen: SocketAddr::from(([0, 0, 0, 0], 7440)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 7443)),
            names: Vec::new(),
            idle_timeout: Duration::from_secs(30),
            session: SessionConfig::default(),
            attest: crate::attest::AttestConfig::default(),
        }
    }
}

/// What a running hub tells its clients; also written to `DATA_DIR/endpoints.json`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Endpoints {
    pub quic: SocketAddr,
    pub admin_url: String,
    pub ca_fingerprint: String,
}

/// The operator CLI's connection settings, written to `DATA_DIR/cli.toml`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct CliContext {
    pub url: String,
    pub token: String,
    pub ca_cert: PathBuf,
}

/// A running hub.
pub struct RunningHub {
    pub endpoints: Endpoints,
    pub store: DynStore,
    pub registry: Arc<Registry>,
    pub keys: Arc<HubKeys>,
    endpoint: quinn::Endpoint,
    tasks: Vec<JoinHandle<()>>,
    /// `DATA_DIR/hub.lock`, locked while this hub runs.
    _lock: std::fs::File,
}

impl RunningHub {
    /// Stops accepting, closes every agent connection with "shutting down", and waits
    /// briefly for the close to go out.
    pub async fn shutdown(self) {
        self.registry.close_all();
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"hub shutting down");
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        // Connections still closing hold the UDP port; give them a moment to drain.
        let _ = tokio::time::timeout(Duration::from_secs(60), self.endpoint.wait_idle()).await;
    }
}

fn admin_url(addr: SocketAddr) -> String {
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else if addr.is_ipv6() {
        format!("[{}]", addr.ip())
    } else {
        addr.ip().to_string()
    };
    format!("https://{host}:{}", addr.port())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// Takes `DATA_DIR/hub.lock` for this process: one hub per data directory. The kernel
/// releases it when the process ends, however it ends.
fn lock_data_dir(dir: &Path) -> Result<std::fs::File> {
    let path = dir.join("hub.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "{} is in use by another cairn-hub (it holds {}): stop that hub first, or give \
             this one another --data-dir",
            dir.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// Starts a hub: creates keys and database on first start, binds both endpoints, and
/// writes `endpoints.json` and `cli.toml` into the data directory.
pub async fn start(cfg: HubConfig) -> Result<RunningHub> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let lock = lock_data_dir(&cfg.data_dir)?;
    let keys = Arc::new(HubKeys::load_or_create(&cfg.data_dir, &cfg.names)?);
    let store: DynStore = Arc::new(SqliteStore::open(
        &cfg.data_dir.join("hub.db"),
        StateSigner::new(keys.state_key.clone()),
    )?);
    let registry = Arc::new(Registry::default());
    let releases_dir = cfg.data_dir.join("releases");
    std::fs::create_dir_all(&releases_dir)
        .with_context(|| format!("creating {}", releases_dir.display()))?;
    api::clean_partial_pushes(&releases_dir);

    let endpoint_cfg = EndpointConfig {
        listen: cfg.listen,
        idle_timeout: cfg.idle_timeout,
        session: cfg.session.clone(),
    };
    // Right after a restart the previous socket may still be closing: retry briefly.
    let bind_deadline = std::time::Instant::now() + Duration::from_secs(60);
    let endpoint = loop {
        match endpoint::bind(&keys, &endpoint_cfg) {
            Ok(e) => break e,
            Err(e)
                if cfg.listen.port() != 0
                    && std::time::Instant::now() < bind_deadline
                    && e.chain().any(|c| {
                        c.downcast_ref::<std::io::Error>()
                            .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse)
                    }) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let quic = endpoint.local_addr()?;
    let shared = Arc::new(Shared {
        store: store.clone(),
        keys: keys.clone(),
        registry: registry.clone(),
        session: cfg.session.clone(),
        attest: cfg.attest.clone(),
        releases_dir: releases_dir.clone(),
        fetch_slots: Arc::new(tokio::sync::Semaphore::new(endpoint::MAX_FETCH_STREAMS)),
    });
    let mut tasks = vec![tokio::spawn(endpoint::accept_loop(
        endpoint.clone(),
        shared,
    ))];

    let listener = tokio::net::TcpListener::bind(cfg.admin_listen)
        .await
        .with_context(|| format!("binding admin API on {}", cfg.admin_listen))?;
    let admin = listener.local_addr()?;
    let api = Api {
        store: store.clone(),
        registry: registry.clone(),
        keys: keys.clone(),
        releases_dir: releases_dir.clone(),
    };
    tasks.push(tokio::spawn(async move {
        if let Err(e) = api::serve(listener, api).await {
            tracing::error!(error = %e, "admin API stopped");
        }
    }));

    let endpoints = Endpoints {
        quic,
        admin_url: admin_url(admin),
        ca_fingerprint: hex::encode(keys.ca_fingerprint()),
    };
    write_atomic(
        &cfg.data_dir.join("endpoints.json"),
        serde_json::to_string_pretty(&endpoints)?.as_bytes(),
    )?;
    let ctx = CliContext {
        url: endpoints.admin_url.clone(),
        token: keys.admin_token.clone(),
        ca_cert: std::path::absolute(cfg.data_dir.join("ca.pem"))?,
    };
    write_atomic(
        &cfg.data_dir.join("cli.toml"),
        toml::to_string(&ctx)?.as_bytes(),
    )?;
    tracing::info!(quic = %quic, admin = %endpoints.admin_url, data_dir = %cfg.data_dir.display(), "hub running");
    Ok(RunningHub {
        endpoints,
        store,
        registry,
        keys,
        endpoint,
        tasks,
        _lock: lock,
    })
}
