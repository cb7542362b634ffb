//! The server over real HTTP on port 0, with small fake models: batching, admission, the
//! errors' statuses and messages, and a graceful shutdown.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gantry_serve::protocol::{BYTES, FP32, PROBABILITIES};
use gantry_serve::{Input, Model, ModelMetadata, ServeConfig, Settings, Stats, TensorMetadata, serve};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const FEATURES: usize = 4;

/// Softmax of each row of its input; optionally waits for the test's go before each forward.
struct Softmax {
    /// Told when a forward starts, then waits for a go.
    gate: Option<(mpsc::Sender<()>, Mutex<mpsc::Receiver<()>>)>,
}

impl Model for Softmax {
    fn metadata(&self) -> ModelMetadata {
        ModelMetadata {
            name: String::new(),
            versions: Vec::new(),
            platform: String::new(),
            inputs: vec![TensorMetadata { name: "x".into(), datatype: FP32.into(), shape: vec![-1, FEATURES as i64] }],
            outputs: vec![TensorMetadata {
                name: PROBABILITIES.into(),
                datatype: FP32.into(),
                shape: vec![-1, FEATURES as i64],
            }],
        }
    }

    fn forward(&mut self, input: Input) -> Result<Vec<f32>, String> {
        if let Some((entered, go)) = &self.gate {
            let _ = entered.send(());
            let _ = go.lock().unwrap().recv();
        }
        let Input::Floats { data, .. } = input else { return Err("text".into()) };
        Ok(data.chunks(FEATURES).flat_map(softmax).collect())
    }
}

fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::MIN, f32::max);
    let exp: Vec<f32> = row.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.iter().map(|e| e / sum).collect()
}

/// A language model of two characters that always predicts `!`.
struct Bang;

impl Model for Bang {
    fn metadata(&self) -> ModelMetadata {
        ModelMetadata {
            name: String::new(),
            versions: Vec::new(),
            platform: String::new(),
            inputs: vec![TensorMetadata { name: "text".into(), datatype: BYTES.into(), shape: vec![-1] }],
            outputs: vec![TensorMetadata { name: PROBABILITIES.into(), datatype: FP32.into(), shape: vec![-1, 2] }],
        }
    }

    fn validate(&self, input: &Input) -> Result<(), String> {
        match input {
            Input::Text(prompts) if prompts.iter().any(|p| p.contains('?')) => Err("no token for '?'".into()),
            _ => Ok(()),
        }
    }

    fn forward(&mut self, input: Input) -> Result<Vec<f32>, String> {
        Ok((0..input.rows()).flat_map(|_| [0.0, 1.0]).collect())
    }

    fn continue_text(&mut self, prompts: &[String], chars: usize) -> Result<Vec<String>, String> {
        Ok(prompts.iter().map(|p| format!("{p}{}", "!".repeat(chars))).collect())
    }
}

struct Server {
    addr: std::net::SocketAddr,
    stats: Arc<Stats>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), gantry_serve::ServeError>>,
}

impl Server {
    async fn start(model: impl Model, name: &str, batching: Settings) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = ServeConfig::new(name, "7", batching);
        let stats = config.stats.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, Box::new(model), config, async {
            let _ = stopped.await;
        }));
        Server { addr, stats, stop: Some(stop), task }
    }

    /// Sends one request (one connection each) and returns its status and body.
    async fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        call(self.addr, method, path, body).await
    }

    async fn infer(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = self.call("POST", path, Some(&body.to_string())).await;
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")))
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

/// A minimal HTTP/1.1 client: one request per connection.
async fn call(addr: std::net::SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let body = body.unwrap_or("");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{response}"));
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn rows(n: usize, first: f32) -> Value {
    let data: Vec<f32> = (0..n * FEATURES).map(|i| first + i as f32 * 0.25).collect();
    json!({"id": format!("r{first}"), "inputs": [{"name": "x", "shape": [n, FEATURES], "datatype": "FP32", "data": data}]})
}

fn probabilities(body: &Value) -> Vec<f32> {
    let out = body["outputs"].as_array().unwrap().iter().find(|o| o["name"] == "probabilities").unwrap();
    out["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_are_batched_and_each_gets_its_own_rows() {
    let batching = Settings { max_batch_size: 6, max_batch_delay: Duration::from_millis(500), max_queue: 100 };
    let server = Arc::new(Server::start(Softmax { gate: None }, "soft", batching).await);
    let mut calls = Vec::new();
    for (i, n) in [1, 2, 3].into_iter().enumerate() {
        let server = server.clone();
        calls.push(tokio::spawn(async move {
            let request = rows(n, i as f32 * 10.0);
            let (status, body) = server.infer("/v2/models/soft/infer", &request).await;
            (n, i, status, body)
        }));
    }
    for call in calls {
        let (n, i, status, body) = call.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["id"], format!("r{}", i as f32 * 10.0));
        assert_eq!(body["model_name"], "soft");
        assert_eq!(body["model_version"], "7");
        assert_eq!(body["outputs"][0]["shape"], json!([n, FEATURES]));
        let data: Vec<f32> = (0..n * FEATURES).map(|k| i as f32 * 10.0 + k as f32 * 0.25).collect();
        let want: Vec<f32> = data.chunks(FEATURES).flat_map(softmax).collect();
        assert_eq!(probabilities(&body), want, "request {i} got another request's rows");
    }
    // 6 rows fill a batch at once: the three requests ran in one forward pass.
    let batches = server.stats.snapshot().batch_size;
    assert_eq!((batches.count, batches.sum), (1, 6.0), "{batches:?}");
    let (status, metrics) = server.call("GET", "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(metrics.contains("gantry_serve_batch_size_bucket{model=\"soft\",le=\"4\"} 0\n"), "{metrics}");
    assert!(metrics.contains("gantry_serve_requests_total{model=\"soft\",code=\"200\"} 3\n"), "{metrics}");
    Arc::into_inner(server).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_refuses_at_once_and_shutdown_finishes_what_was_admitted() {
    let (entered_tx, entered) = mpsc::channel();
    let (go, go_rx) = mpsc::channel();
    let model = Softmax { gate: Some((entered_tx, Mutex::new(go_rx))) };
    let batching = Settings { max_batch_size: 1, max_batch_delay: Duration::from_millis(1), max_queue: 2 };
    let server = Server::start(model, "soft", batching).await;
    let addr = server.addr;
    let send = |i: usize| {
        tokio::spawn(
            async move { call(addr, "POST", "/v2/models/soft/infer", Some(&rows(1, i as f32).to_string())).await },
        )
    };
    // The first is in the model, blocked; two more wait.
    let first = send(0);
    tokio::task::spawn_blocking(move || entered.recv_timeout(Duration::from_secs(10)).unwrap()).await.unwrap();
    let waiting = [send(1), send(2)];
    for _ in 0..500 {
        if server.stats.queue_depth() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.stats.queue_depth(), 2);
    let (status, body) = server.call("POST", "/v2/models/soft/infer", Some(&rows(1, 9.0).to_string())).await;
    assert_eq!(status, 503, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert!(body["error"].as_str().unwrap().contains("queue is full"), "{body}");

    // Shutting down now still answers the three admitted.
    let Server { stop, task, .. } = server;
    stop.unwrap().send(()).unwrap();
    for _ in 0..3 {
        go.send(()).unwrap();
    }
    assert_eq!(first.await.unwrap().0, 200);
    for call in waiting {
        assert_eq!(call.await.unwrap().0, 200);
    }
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn bad_requests_get_400s_naming_the_field_and_unknown_models_404s() {
    let server = Server::start(Softmax { gate: None }, "soft", Settings::default()).await;
    let bad = json!({"inputs": [{"name": "x", "shape": [3, 5], "datatype": "FP32", "data": vec![0; 15]}]});
    let (status, body) = server.infer("/v2/models/soft/infer", &bad).await;
    assert_eq!((status, body["error"].as_str().unwrap()), (400, "inputs[0].shape: expected [N, 4], got [3, 5]"));
    let bad = json!({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, "three", 4]}]});
    let (status, body) = server.infer("/v2/models/soft/infer", &bad).await;
    assert_eq!(
        (status, body["error"].as_str().unwrap()),
        (400, "inputs[0].data[2]: expected a finite FP32 number, got \"three\"")
    );
    let (status, body) = server.call("POST", "/v2/models/soft/infer", Some(r#"{"inputs": [{"name": 3}]}"#)).await;
    assert_eq!(status, 400);
    assert!(body.contains(r#""error":"inputs[0].name: invalid type: integer `3`"#), "{body}");
    let mut generate = rows(1, 0.0);
    generate["parameters"] = json!({"generate": 3});
    let (status, body) = server.infer("/v2/models/soft/infer", &generate).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().starts_with("parameters.generate:"), "{body}");

    let (status, body) = server.infer("/v2/models/other/infer", &rows(1, 0.0)).await;
    assert_eq!(
        (status, body["error"].as_str().unwrap()),
        (404, "unknown model \"other\": this server serves \"soft\"")
    );
    let (status, _) = server.infer("/v2/models/soft/versions/8/infer", &rows(1, 0.0)).await;
    assert_eq!(status, 404);
    let (status, body) = server.infer("/v2/models/soft/versions/7/infer", &rows(1, 0.0)).await;
    assert_eq!(status, 200, "{body}");

    let (status, body) = server.call("GET", "/v2/models/soft", None).await;
    assert_eq!(status, 200);
    let meta: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(meta["name"], "soft");
    assert_eq!(meta["versions"], json!(["7"]));
    assert_eq!(meta["platform"], "gantry");
    assert_eq!(meta["inputs"][0], json!({"name": "x", "datatype": "FP32", "shape": [-1, 4]}));
    for path in ["/v2/health/live", "/v2/health/ready", "/v2/models/soft/ready", "/v2"] {
        assert_eq!(server.call("GET", path, None).await.0, 200, "{path}");
    }
    assert_eq!(server.call("GET", "/v2/models/other", None).await.0, 404);
    let codes = server.stats.snapshot().requests;
    assert_eq!((codes["400"], codes["404"], codes["200"]), (4, 2, 1), "{codes:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_text_model_continues_prompts_and_refuses_what_it_has_no_token_for() {
    let server = Server::start(Bang, "lm", Settings::default()).await;
    let request = json!({
        "parameters": {"generate": 3},
        "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["In the", "And"]}],
    });
    let (status, body) = server.infer("/v2/models/lm/infer", &request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outputs"][0]["shape"], json!([2, 2]));
    assert_eq!(
        body["outputs"][1],
        json!({"name": "continuation", "shape": [2], "datatype": "BYTES", "data": ["In the!!!", "And!!!"]})
    );
    let request = json!({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["why?"]}]});
    let (status, body) = server.infer("/v2/models/lm/infer", &request).await;
    assert_eq!((status, body["error"].as_str().unwrap()), (400, "inputs[0].data: no token for '?'"));
    server.stop().await;
}
