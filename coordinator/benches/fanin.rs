//! `cargo bench --bench fanin`: what telemetry from many agents costs the coordinator.
//!
//! The bench runs the coordinator in this process and re-executes itself as a second process
//! that simulates the agents (each with its own connection, 8 GPUs, a heartbeat a second), so
//! the CPU time measured here (getrusage) is the coordinator's alone. Baselines: the same
//! coordinator idle over the same window, and heartbeats without job metrics before heartbeats
//! with them; and the whole run once in plaintext without auth, once as a coordinator serves by
//! default: TLS, and agents that joined with a token and prove who they are with their client
//! certificate on every call. One JSON object per line.

use std::time::{Duration, Instant};

use gantry_proto::{ClientTls, PROTOCOL_VERSION, v1};

/// After every agent is connected (with TLS, each first joins and shakes hands twice), before
/// the window opens.
const WARMUP: Duration = Duration::from_secs(5);
/// How long the agents may take to connect, at most.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(180);
const WINDOW: Duration = Duration::from_secs(15);

fn cpu_seconds() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

fn inventory(agent: usize, tick: u64) -> v1::Inventory {
    v1::Inventory {
        hostname: format!("sim-{agent}"),
        cpus: 64,
        memory_bytes: 512 << 30,
        gpus: (0..8)
            .map(|g| v1::GpuInfo {
                uuid: format!("GPU-{agent:04}-{g}"),
                name: "NVIDIA H100 80GB HBM3".into(),
                memory_total_bytes: 80 << 30,
                index: g,
                memory_used_bytes: Some(((tick + g as u64) % 80) << 30),
                utilization_percent: Some(((tick * 7 + g as u64) % 100) as u32),
                temperature_c: Some(40 + (tick % 30) as u32),
                power_mw: Some(300_000),
                healthy: true,
                ..Default::default()
            })
            .collect(),
        gpu_driver: "580".into(),
        nvml_error: String::new(),
        images: Vec::new(),
    }
}

async fn connect(url: &str, tls: &ClientTls) -> tonic::transport::Channel {
    loop {
        match gantry_proto::endpoint(url, tls).unwrap().connect().await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// An agent's TLS after joining with `token`, as `gantry agent` does; none without a CA.
async fn join(url: &str, name: &str, token: Option<&str>, ca: Option<&str>) -> Result<ClientTls, tonic::Status> {
    let (Some(token), Some(ca)) = (token, ca) else { return Ok(ClientTls::default()) };
    let key = rcgen::KeyPair::generate().unwrap();
    let server_only = ClientTls { ca_pem: Some(ca.to_string()), identity: None };
    let bearer = gantry_proto::Bearer::new(Some(token)).unwrap();
    let mut client = v1::join_client::JoinClient::with_interceptor(connect(url, &server_only).await, bearer);
    let request = v1::JoinRequest { name: name.to_string(), public_key: key.public_key_raw().to_vec() };
    let certificate = client.join(request).await?.into_inner().certificate_pem;
    Ok(ClientTls { ca_pem: Some(ca.to_string()), identity: Some((certificate, key.serialize_pem())) })
}

/// The agents' side: `n` agents heartbeating once a second until killed, each heartbeat with
/// `jobs` training jobs' metric points.
async fn agents(url: String, n: usize, jobs: u32, token: Option<String>, ca: Option<String>) {
    let mut tasks = Vec::new();
    for a in 0..n {
        let (url, token, ca) = (url.clone(), token.clone(), ca.clone());
        tasks.push(tokio::spawn(async move {
            let name = format!("sim-{a}");
            // A thousand agents connecting at once meet resets and full accept queues, as a
            // real fleet restarting would: each tries again, as `gantry agent` does.
            loop {
                match agent(a, n, &name, jobs, &url, token.as_deref(), ca.as_deref()).await {
                    Ok(()) => return,
                    Err(_) => tokio::time::sleep(Duration::from_millis(200 + (a % 50) as u64 * 20)).await,
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// One simulated agent: join, register, then heartbeat once a second until the bench ends.
async fn agent(
    a: usize,
    n: usize,
    name: &str,
    jobs: u32,
    url: &str,
    token: Option<&str>,
    ca: Option<&str>,
) -> Result<(), tonic::Status> {
    let tls = join(url, name, token, ca).await?;
    let mut client = v1::agents_client::AgentsClient::new(connect(url, &tls).await);
    let req = v1::RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        name: name.to_string(),
        inventory: Some(inventory(a, 0)),
        ..Default::default()
    };
    client.register(req).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let beat = |tick| v1::AgentMessage {
        name: name.to_string(),
        msg: Some(v1::agent_message::Msg::Heartbeat(v1::Heartbeat {
            inventory: Some(inventory(a, tick)),
            jobs: vec![],
            // Training jobs (one per GPU at most), each reporting a step's figures.
            metrics: (0..jobs)
                .map(|g| v1::RankMetrics {
                    job_id: format!("sim-{a}-{g}"),
                    attempt: 1,
                    rank: 0,
                    points: vec![v1::MetricPoint {
                        step: tick,
                        time_ms: 0,
                        values: [("loss", 0.5), ("accuracy", 0.9), ("samples_per_s", 1e4), ("step_time_ms", 30.0)]
                            .into_iter()
                            .map(|(k, v)| (k.to_string(), v))
                            .collect(),
                    }],
                    straggler: false,
                })
                .collect(),
            seq: tick,
        })),
    };
    tx.send(beat(0)).await.unwrap();
    let mut inbound = client.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    // Read what the coordinator sends (an ack per heartbeat), as an agent does.
    tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
    // Spread the agents over the second, as real ones would be.
    tokio::time::sleep(Duration::from_millis((a * 1000 / n) as u64)).await;
    let mut tick = 1;
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        every.tick().await;
        if tx.send(beat(tick)).await.is_err() {
            return Err(tonic::Status::unavailable("session ended"));
        }
        tick += 1;
    }
}

/// The agents' join token in the run with auth, and the token the bench counts nodes with.
const AGENT_SECRET: &str = "fanin-bench-agent-secret";
const ADMIN_SECRET: &str = "fanin-bench-admin-secret";

fn main() {
    if let Ok(spec) = std::env::var("GANTRY_FANIN_AGENTS") {
        let parts: Vec<&str> = spec.split(' ').collect();
        let [url, n, jobs, token, ca] = parts[..] else { panic!("GANTRY_FANIN_AGENTS is `URL N JOBS TOKEN|- CA|-`") };
        let token = (token != "-").then(|| token.to_string());
        let ca = (ca != "-").then(|| std::fs::read_to_string(ca).unwrap());
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(agents(url.to_string(), n.parse().unwrap(), jobs.parse().unwrap(), token, ca));
        return;
    }
    // The same fleet against a coordinator in plaintext without auth (the baseline), then one
    // with TLS and auth, as coordinators serve by default.
    for auth in [false, true] {
        measure(auth);
    }
}

fn measure(auth: bool) {
    use gantry_coordinator::auth::{Role, tokens::SeedToken};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (grpc, http) = rt.block_on(async {
        (
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        )
    });
    let scheme = if auth { "https" } else { "http" };
    let url = format!("{scheme}://{}", grpc.local_addr().unwrap());
    let tls_dir = dir.path().join("tls");
    let tls = auth.then(|| gantry_coordinator::tls::TlsOptions {
        dir: tls_dir.clone(),
        names: vec!["127.0.0.1".into()],
        ..Default::default()
    });
    let seed = |name: &str, role, secret: &str| SeedToken { name: name.into(), role, secret: secret.into() };
    let config = gantry_coordinator::Config {
        data_dir: dir.path().to_path_buf(),
        settings: gantry_coordinator::Settings { auth, ..Default::default() },
        store: None,
        object_store: None,
        tokens: vec![seed("agents", Role::Agent, AGENT_SECRET), seed("bench", Role::Admin, ADMIN_SECRET)],
        tls,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    rt.spawn(gantry_coordinator::serve(config, grpc, http, async move {
        let _ = stopped.await;
    }));
    let mode = if auth { "tokens and agent certificates" } else { "no auth" };

    // Baseline: the coordinator idle.
    std::thread::sleep(Duration::from_secs(1));
    let ca_file = tls_dir.join("ca.crt");
    let (ca, admin_tls) = if auth {
        let pem = std::fs::read_to_string(&ca_file).unwrap();
        (ca_file.display().to_string(), ClientTls { ca_pem: Some(pem), identity: None })
    } else {
        ("-".to_string(), ClientTls::default())
    };
    let (c0, t0) = (cpu_seconds(), Instant::now());
    std::thread::sleep(WINDOW);
    let idle = (cpu_seconds() - c0) / t0.elapsed().as_secs_f64();

    // 1,000 agents: the fleet size the goal is stated for. First GPU telemetry alone (the
    // same-run baseline), then with 8 training jobs' metrics in every heartbeat.
    for jobs in [0u32, 8] {
        let n = 1000usize;
        let token = if auth { AGENT_SECRET } else { "-" };
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .env("GANTRY_FANIN_AGENTS", format!("{url} {n} {jobs} {token} {ca}"))
            .spawn()
            .unwrap();
        // Count what the coordinator sees, so the figure is about sessions that are really open.
        let connected = || {
            rt.block_on(async {
                let Ok(channel) = gantry_proto::endpoint(&url, &admin_tls).unwrap().connect().await else { return 0 };
                let bearer = gantry_proto::Bearer::new(Some(ADMIN_SECRET)).unwrap();
                let mut c = v1::gantry_client::GantryClient::with_interceptor(channel, bearer);
                match c.list_nodes(v1::ListNodesRequest {}).await {
                    Ok(r) => r.into_inner().nodes.iter().filter(|n| n.connected).count(),
                    Err(_) => 0,
                }
            })
        };
        let started = Instant::now();
        while connected() < n && started.elapsed() < CONNECT_TIMEOUT {
            std::thread::sleep(Duration::from_millis(500));
        }
        let connect_s = started.elapsed().as_secs_f64();
        std::thread::sleep(WARMUP);
        let (c0, t0) = (cpu_seconds(), Instant::now());
        std::thread::sleep(WINDOW);
        let busy = (cpu_seconds() - c0) / t0.elapsed().as_secs_f64();
        let connected_at_end = connected();
        let _ = child.kill();
        let _ = child.wait();
        // The next run starts from no open session.
        let gone = Instant::now();
        while connected() > 0 && gone.elapsed() < CONNECT_TIMEOUT {
            std::thread::sleep(Duration::from_millis(200));
        }
        let connected = connected_at_end;
        println!(
            "{}",
            serde_json::json!({
                "bench": "fanin", "auth": mode, "tls": auth, "agents": n, "agents_connected": connected,
                "seconds_to_connect_all": connect_s,
                "gpus_per_agent": 8, "heartbeat_hz": 1,
                "job_metrics_per_heartbeat": jobs,
                "window_s": WINDOW.as_secs(), "coordinator_core_fraction": busy,
                "baseline_idle_core_fraction": idle, "heartbeats_per_s": connected,
                "cpu_us_per_heartbeat": (busy - idle) * 1e6 / connected.max(1) as f64, "goal_core_fraction": 0.25
            })
        );
    }
    let _ = stop.send(());
    rt.shutdown_timeout(Duration::from_secs(5));
}
