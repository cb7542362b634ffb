//! A coordinator served in this process on 127.0.0.1:0 (listeners bound here, so no other
//! process can take the port first), and agents played by the test over real gRPC: it decides
//! what each agent reports and when it falls silent. Meant for tokio's paused clock.

#![allow(dead_code)]

use std::time::Duration;

use gantry_coordinator::{Config, Settings};
use gantry_proto::v1::agents_client::AgentsClient;
use gantry_proto::v1::gantry_client::GantryClient;
use gantry_proto::{PROTOCOL_VERSION, v1};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;

pub struct TestCoordinator {
    pub grpc: std::net::SocketAddr,
    pub http: std::net::SocketAddr,
    pub settings: Settings,
    stop: Option<oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<gantry_coordinator::Result<()>>,
    _dir: tempfile::TempDir,
}

impl TestCoordinator {
    /// Agents time out after 10 s and heartbeat every second.
    pub async fn start() -> TestCoordinator {
        let settings = Settings {
            agent_timeout: Duration::from_secs(10),
            grace_period: Duration::from_secs(3),
            heartbeat_interval: Duration::from_secs(1),
            // These tests are about the lifecycle; tests/security in the CLI cover auth.
            auth: false,
            ..Settings::default()
        };
        TestCoordinator::with(settings).await
    }

    pub async fn with(settings: Settings) -> TestCoordinator {
        let dir = tempfile::tempdir().unwrap();
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            settings: settings.clone(),
            store: None,
            object_store: None,
            tokens: Vec::new(),
            tls: None,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(gantry_coordinator::serve(config, grpc, http, async move {
            let _ = stopped.await;
        }));
        TestCoordinator { grpc: grpc_addr, http: http_addr, settings, stop: Some(stop), served, _dir: dir }
    }

    fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc)).unwrap().connect_lazy()
    }

    /// The agents' service, as an agent reaches it.
    pub fn agents(&self) -> AgentsClient<Channel> {
        AgentsClient::new(self.channel())
    }

    pub fn users(&self) -> GantryClient<Channel> {
        GantryClient::new(self.channel())
    }

    pub async fn submit(&self, yaml: &str) -> String {
        let spec = gantry_core::JobSpec::from_yaml(yaml).unwrap();
        let req = v1::SubmitRequest { spec: Some(v1::JobSpec::from(&spec)) };
        self.users().submit(req).await.unwrap().into_inner().job_id
    }

    pub async fn job(&self, id: &str) -> v1::Job {
        self.users().get_job(v1::GetJobRequest { job_id: id.into() }).await.unwrap().into_inner()
    }

    /// `/metrics`, as Prometheus reads it (plain HTTP: these tests run without auth).
    pub async fn metrics(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(self.http).await.unwrap();
        conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").await.unwrap();
        let mut body = String::new();
        conn.read_to_string(&mut body).await.unwrap();
        body
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let _ = (&mut self.served).await;
    }
}

/// An agent played by the test: it registers, opens a session, and heartbeats every second
/// with the jobs it says it holds, until it falls silent or leaves.
pub struct TestAgent {
    pub name: String,
    /// What the coordinator sent, in order.
    pub inbox: mpsc::Receiver<v1::CoordinatorMessage>,
    holds: std::sync::Arc<std::sync::Mutex<Vec<v1::JobReport>>>,
    silent: std::sync::Arc<std::sync::atomic::AtomicBool>,
    heartbeats: tokio::task::JoinHandle<()>,
    reports: mpsc::Sender<v1::AgentMessage>,
}

pub fn inventory(cpus: u32) -> v1::Inventory {
    v1::Inventory { cpus, memory_bytes: 64 << 30, ..Default::default() }
}

pub fn running(job: &str, attempt: u32, rank: u32) -> v1::JobReport {
    v1::JobReport {
        job_id: job.into(),
        attempt,
        rank,
        phase: v1::job_report::Phase::Running as i32,
        ..Default::default()
    }
}

impl TestAgent {
    /// Joins holding no job.
    pub async fn join(c: &TestCoordinator, name: &str) -> TestAgent {
        TestAgent::join_holding(c, name, Vec::new()).await
    }

    /// Joins (or rejoins) saying it holds `holds`.
    pub async fn join_holding(c: &TestCoordinator, name: &str, holds: Vec<v1::JobReport>) -> TestAgent {
        let mut client = c.agents();
        client
            .register(v1::RegisterRequest {
                protocol_version: PROTOCOL_VERSION,
                name: name.into(),
                inventory: Some(inventory(8)),
                advertise_addr: "127.0.0.1".into(),
            })
            .await
            .unwrap();
        let holds = std::sync::Arc::new(std::sync::Mutex::new(holds));
        let heartbeat = |holds: &std::sync::Mutex<Vec<v1::JobReport>>| v1::AgentMessage {
            name: name.to_string(),
            msg: Some(v1::agent_message::Msg::Heartbeat(v1::Heartbeat {
                inventory: Some(inventory(8)),
                jobs: holds.lock().unwrap().clone(),
                metrics: Vec::new(),
                ..Default::default()
            })),
        };
        let (reports, outbound) = mpsc::channel(64);
        reports.send(heartbeat(&holds)).await.unwrap();
        let mut inbound =
            client.session(tokio_stream::wrappers::ReceiverStream::new(outbound)).await.unwrap().into_inner();
        let (to_test, inbox) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Ok(Some(msg)) = inbound.message().await {
                if to_test.send(msg).await.is_err() {
                    break;
                }
            }
        });
        let silent = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let heartbeats = {
            let (holds, silent, reports, name) = (holds.clone(), silent.clone(), reports.clone(), name.to_string());
            let interval = c.settings.heartbeat_interval;
            tokio::spawn(async move {
                let mut seq = 0;
                loop {
                    tokio::time::sleep(interval).await;
                    if silent.load(std::sync::atomic::Ordering::Relaxed) {
                        continue;
                    }
                    seq += 1;
                    let msg = v1::AgentMessage {
                        name: name.clone(),
                        msg: Some(v1::agent_message::Msg::Heartbeat(v1::Heartbeat {
                            inventory: Some(inventory(8)),
                            jobs: holds.lock().unwrap().clone(),
                            metrics: Vec::new(),
                            seq,
                        })),
                    };
                    if reports.send(msg).await.is_err() {
                        return;
                    }
                }
            })
        };
        TestAgent { name: name.into(), inbox, holds, silent, heartbeats, reports }
    }

    /// The next assignment the coordinator sends, holding it from then on (as a real agent does).
    pub async fn next_assignment(&mut self) -> v1::Assignment {
        loop {
            let msg = self.inbox.recv().await.expect("the session ended before an assignment");
            if let Some(v1::coordinator_message::Msg::Assign(a)) = msg.msg {
                self.holds.lock().unwrap().push(running(&a.job_id, a.attempt, a.rank));
                return a;
            }
        }
    }

    /// The next cancel the coordinator sends.
    pub async fn next_cancel(&mut self) -> v1::Cancel {
        loop {
            let msg = self.inbox.recv().await.expect("the session ended before a cancel");
            if let Some(v1::coordinator_message::Msg::Cancel(c)) = msg.msg {
                return c;
            }
        }
    }

    /// The sequence number of the next heartbeat the coordinator acknowledges.
    pub async fn next_ack(&mut self) -> u64 {
        loop {
            let msg = self.inbox.recv().await.expect("the session ended before an ack");
            if let Some(v1::coordinator_message::Msg::Ack(ack)) = msg.msg {
                return ack.seq;
            }
        }
    }

    /// Reports that a rank it holds exited with `code`.
    pub async fn exit(&self, job: &str, attempt: u32, rank: u32, code: i32) {
        let report = v1::JobReport {
            phase: v1::job_report::Phase::Exited as i32,
            exit_code: Some(code),
            ..running(job, attempt, rank)
        };
        self.report_exit(report).await;
    }

    /// Reports `report`, an exit, for a rank it holds.
    pub async fn report_exit(&self, report: v1::JobReport) {
        self.holds
            .lock()
            .unwrap()
            .retain(|r| !(r.job_id == report.job_id && r.attempt == report.attempt && r.rank == report.rank));
        let msg = v1::AgentMessage { name: self.name.clone(), msg: Some(v1::agent_message::Msg::Job(report)) };
        self.reports.send(msg).await.unwrap();
    }

    /// Stops heartbeating, with the connection left open: a node cut off or frozen.
    pub fn fall_silent(&self) {
        self.silent.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the coordinator has closed this agent's session.
    pub async fn session_closed(&mut self) -> bool {
        loop {
            match self.inbox.recv().await {
                None => return true,
                Some(_) => continue,
            }
        }
    }

    /// Leaves: the session's stream ends.
    pub fn leave(self) {
        self.heartbeats.abort();
    }
}

/// Polls the job until `pred` holds, on the test's clock (paused time advances as it waits).
pub async fn wait_for(c: &TestCoordinator, id: &str, what: &str, pred: impl Fn(&v1::Job) -> bool) -> v1::Job {
    for _ in 0..600 {
        let job = c.job(id).await;
        if pred(&job) {
            return job;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("job {id}: {what} did not happen within a minute of (paused) time: {:?}", c.job(id).await);
}
