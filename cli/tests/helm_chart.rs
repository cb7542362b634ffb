//! The Helm chart (`charts/gantry`), with a real helm and offline Kubernetes schemas: it lints,
//! renders with every value set, validates against Kubernetes 1.30 and 1.33, refuses bad
//! values, and what it renders means what an operator needs (GPU nodes only, probes on real
//! endpoints, the store's and the checkpoint storage's settings in the coordinator's arguments,
//! a coordinator started as the chart starts it using a real S3 server). `.ci/run` installs helm,
//! kubernetes-validate and moto; `HELM` and `KUBERNETES_VALIDATE` may name them.

mod support;

#[cfg(feature = "s3")]
#[path = "support/s3_server.rs"]
mod s3_server;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_yaml::Value;
use support::{free_port, http_get, repo_root};

fn tool(var: &str, name: &str) -> String {
    let tool = std::env::var(var).unwrap_or_else(|_| name.to_string());
    let found = Command::new(&tool).arg("--help").output().is_ok_and(|o| o.status.success());
    assert!(found, "`{tool}` is needed (set {var}); .ci/run installs it");
    tool
}

fn chart() -> PathBuf {
    repo_root().join("charts/gantry")
}

fn helm(args: &[&str]) -> Output {
    Command::new(tool("HELM", "helm")).args(args).output().expect("helm runs")
}

/// The manifests rendered with `values` files and `--set` pairs, or helm's error.
fn render(values: &[&str], set: &[&str]) -> Result<String, String> {
    let chart = chart();
    let mut args = vec!["template", "t", chart.to_str().unwrap()];
    for v in values {
        args.extend(["-f", v]);
    }
    for s in set {
        args.extend(["--set", s]);
    }
    let out = helm(&args);
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn ci_values(name: &str) -> String {
    chart().join("ci").join(name).to_str().unwrap().to_string()
}

/// Every rendered object, by "Kind/name".
fn objects(text: &str) -> BTreeMap<String, Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .map(|v| (format!("{}/{}", v["kind"].as_str().unwrap(), v["metadata"]["name"].as_str().unwrap()), v))
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence().map(|s| s.iter().map(|x| x.as_str().unwrap().to_string()).collect()).unwrap_or_default()
}

/// The coordinator's arguments as the container sees them: `$(VAR)` filled from its ConfigMap
/// and its `env` (POD_IP given here).
fn coordinator_args(objs: &BTreeMap<String, Value>, pod_ip: &str) -> (Vec<String>, BTreeMap<String, String>) {
    let config: BTreeMap<String, String> = serde_yaml::from_value(objs["ConfigMap/t-gantry"]["data"].clone()).unwrap();
    let container = &objs["StatefulSet/t-gantry"]["spec"]["template"]["spec"]["containers"][0];
    let mut vars = config.clone();
    vars.insert("POD_IP".into(), pod_ip.into());
    let args = strings(&container["args"])
        .into_iter()
        .map(|mut a| {
            for (k, v) in &vars {
                a = a.replace(&format!("$({k})"), v);
            }
            a
        })
        .collect();
    (args, config)
}

#[test]
fn the_chart_lints_and_every_value_set_renders_valid_kubernetes_1_30_and_1_33() {
    let lint = helm(&["lint", "--strict", chart().to_str().unwrap()]);
    assert!(lint.status.success(), "{}", String::from_utf8_lossy(&lint.stdout));
    let validate = tool("KUBERNETES_VALIDATE", "kubernetes-validate");
    let dir = tempfile::tempdir().unwrap();
    let sets = [
        "",
        "ha-etcd-values.yaml",
        "external-etcd-values.yaml",
        "s3-values.yaml",
        "cpu-agents-values.yaml",
        "container-engine-values.yaml",
    ];
    for set in sets {
        let values: Vec<String> = (!set.is_empty()).then(|| ci_values(set)).into_iter().collect();
        let refs: Vec<&str> = values.iter().map(String::as_str).collect();
        let text = render(&refs, &[]).unwrap_or_else(|e| panic!("{set}: {e}"));
        let file = dir.path().join("rendered.yaml");
        std::fs::write(&file, &text).unwrap();
        for version in ["1.30.0", "1.33.0"] {
            let out = Command::new(&validate)
                .args(["--strict", "--quiet", "-k", version])
                .arg(&file)
                .output()
                .expect("kubernetes-validate runs");
            let report = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "values {set:?}, Kubernetes {version}:\n{report}");
            // Only the Prometheus Operator's CRD has no schema offline.
            for line in report.lines().filter(|l| l.contains("Couldn't find schema")) {
                assert!(line.contains("ServiceMonitor"), "{line}");
            }
        }
    }
}

#[test]
fn values_of_the_wrong_type_and_unknown_keys_are_refused() {
    let err = render(&[], &["coordinator.replicas=two"]).unwrap_err();
    assert!(err.contains("coordinator.replicas") && err.contains("Expected: integer"), "{err}");
    let err = render(&[], &["agent.gpus=true"]).unwrap_err();
    assert!(err.contains("Additional property gpus is not allowed"), "{err}");
    let err = render(&[], &["etcd.endpoints={etcd:2379}"]).unwrap_err();
    assert!(err.contains("etcd.endpoints"), "an endpoint without its scheme: {err}");
    // More than one coordinator without any etcd is refused with the way out.
    let err = render(&[], &["coordinator.replicas=3"]).unwrap_err();
    assert!(err.contains("needs etcd"), "{err}");
    // Or without shared checkpoint storage: each coordinator has its own volume.
    let err = render(&[], &["coordinator.replicas=3", "etcd.deploy=true"]).unwrap_err();
    assert!(err.contains("needs objectStore.url"), "{err}");
    let err = render(&[], &["objectStore.url=gs://bucket"]).unwrap_err();
    assert!(err.contains("objectStore.url"), "only s3:// is supported: {err}");
}

#[test]
fn agents_reach_only_gpu_nodes_with_the_nvidia_runtime_and_no_rbac_is_granted() {
    let objs = objects(&render(&[], &[]).unwrap());
    let pod = &objs["DaemonSet/t-gantry-agent"]["spec"]["template"]["spec"];
    assert_eq!(pod["runtimeClassName"], "nvidia");
    assert_eq!(pod["nodeSelector"]["nvidia.com/gpu.present"], "true");
    let tolerations = pod["tolerations"].as_sequence().unwrap();
    assert!(tolerations.iter().any(|t| t["key"] == "nvidia.com/gpu" && t["effect"] == "NoSchedule"));
    let args = strings(&pod["containers"][0]["args"]);
    assert!(args.contains(&"--name=$(NODE_NAME)".to_string()), "{args:?}");
    assert!(args.contains(&"--coordinator=https://t-gantry:7070".to_string()), "{args:?}");
    let env = pod["containers"][0]["env"].as_sequence().unwrap();
    let node_name = env.iter().find(|e| e["name"] == "NODE_NAME").expect("NODE_NAME");
    assert_eq!(node_name["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    // The agent's Service address is the coordinator Service's.
    assert!(objs.contains_key("Service/t-gantry"));
    // gantry calls no Kubernetes API: no Role, no binding, no token.
    assert!(objs.keys().all(|k| !k.contains("Role")), "{:?}", objs.keys());
    assert_eq!(pod["automountServiceAccountToken"], false);

    let cpu = objects(&render(&[&ci_values("cpu-agents-values.yaml")], &[]).unwrap());
    let pod = &cpu["DaemonSet/t-gantry-agent"]["spec"]["template"]["spec"];
    assert!(pod["runtimeClassName"].is_null() && pod["nodeSelector"].is_null(), "{pod:?}");
}

/// Container jobs are off unless a node's engine socket is given; then the agent mounts it,
/// joins its group, runs on the host network and keeps its work directory at the host's path.
#[test]
fn the_container_engine_socket_is_opt_in_and_brings_what_it_needs() {
    let pod = |objs: &BTreeMap<String, Value>| objs["DaemonSet/t-gantry-agent"]["spec"]["template"]["spec"].clone();
    let off = pod(&objects(&render(&[], &[]).unwrap()));
    assert!(strings(&off["containers"][0]["args"]).contains(&"--container-engine=none".to_string()));
    assert!(off["hostNetwork"].is_null());
    let set = ["agent.containerEngine.socket=/var/run/docker.sock", "agent.containerEngine.socketGroup=998"];
    let err = render(&[], &set).unwrap_err();
    assert!(err.contains("needs agent.workDirHostPath"), "{err}");
    let on = pod(&objects(&render(&[], &[set[0], set[1], "agent.workDirHostPath=/srv/gantry"]).unwrap()));
    let args = strings(&on["containers"][0]["args"]);
    for want in ["--container-engine=/run/gantry/engine.sock", "--container-gpus=nvidia", "--work-dir=/srv/gantry"] {
        assert!(args.contains(&want.to_string()), "{want}: {args:?}");
    }
    assert_eq!(on["hostNetwork"], true);
    assert_eq!(on["securityContext"]["supplementalGroups"][0], 998);
    let volumes = on["volumes"].as_sequence().unwrap();
    let engine = volumes.iter().find(|v| v["name"] == "engine").expect("the engine volume");
    assert_eq!(
        (engine["hostPath"]["path"].as_str(), engine["hostPath"]["type"].as_str()),
        (Some("/var/run/docker.sock"), Some("Socket"))
    );
    let mounts = on["containers"][0]["volumeMounts"].as_sequence().unwrap();
    assert!(mounts.iter().any(|m| m["name"] == "work" && m["mountPath"] == "/srv/gantry"), "{mounts:?}");
    let bad = render(&[], &["agent.containerEngine.gpus=amd"]).unwrap_err();
    assert!(bad.contains("gpus"), "{bad}");
}

/// GPU nodes can run the GPU flavour of the image while the coordinators keep the plain one.
#[test]
fn the_agents_image_can_be_the_gpu_flavour() {
    let image = |objs: &BTreeMap<String, Value>, workload: &str| {
        objs[workload]["spec"]["template"]["spec"]["containers"][0]["image"].as_str().unwrap().to_string()
    };
    let version = env!("CARGO_PKG_VERSION");
    let plain = objects(&render(&[], &[]).unwrap());
    assert_eq!(image(&plain, "DaemonSet/t-gantry-agent"), format!("gantry:{version}"));
    let gpu = objects(&render(&[], &[&format!("agent.image.tag={version}-cuda")]).unwrap());
    assert_eq!(image(&gpu, "DaemonSet/t-gantry-agent"), format!("gantry:{version}-cuda"));
    assert_eq!(image(&gpu, "StatefulSet/t-gantry"), format!("gantry:{version}"));
    let elsewhere = objects(&render(&[], &["image.repository=team/gantry"]).unwrap());
    assert_eq!(image(&elsewhere, "DaemonSet/t-gantry-agent"), format!("team/gantry:{version}"));
}

#[test]
fn the_store_settings_reach_the_coordinators_arguments() {
    let objs = objects(&render(&[&ci_values("external-etcd-values.yaml")], &[]).unwrap());
    let (args, _) = coordinator_args(&objs, "10.0.0.7");
    for want in [
        "--store=etcd",
        "--etcd=http://etcd-0.etcd:2379,http://etcd-1.etcd:2379,http://etcd-2.etcd:2379",
        "--etcd-prefix=/gantry-prod",
        "--leader-ttl=5s",
        "--advertise-host=10.0.0.7",
    ] {
        assert!(args.contains(&want.to_string()), "{want} in {args:?}");
    }
    let sts = &objs["StatefulSet/t-gantry"]["spec"];
    assert_eq!(sts["replicas"], 2);
    let claim = &sts["volumeClaimTemplates"][0]["spec"];
    assert_eq!(
        (&claim["storageClassName"], &claim["resources"]["requests"]["storage"]),
        (&"fast-ssd".into(), &"20Gi".into())
    );
    assert!(!objs.keys().any(|k| k.contains("etcd")), "an external etcd is not deployed: {:?}", objs.keys());

    let ha = objects(&render(&[&ci_values("ha-etcd-values.yaml")], &[]).unwrap());
    let (args, _) = coordinator_args(&ha, "10.0.0.7");
    let members: Vec<String> = (0..3).map(|i| format!("http://t-gantry-etcd-{i}.t-gantry-etcd:2379")).collect();
    assert!(args.contains(&format!("--etcd={}", members.join(","))), "{args:?}");
    assert_eq!(ha["StatefulSet/t-gantry-etcd"]["spec"]["replicas"], 3);
    assert!(args.contains(&"--queue=prod=3:16".to_string()), "{args:?}");
    assert!(ha.contains_key("ServiceMonitor/t-gantry"));

    let embedded = objects(&render(&[], &[]).unwrap());
    let (args, _) = coordinator_args(&embedded, "10.0.0.7");
    assert!(args.contains(&"--store=embedded".to_string()), "{args:?}");
    assert!(!args.iter().any(|a| a.starts_with("--etcd") || a.starts_with("--checkpoint")), "{args:?}");
}

#[test]
fn the_object_store_settings_reach_the_coordinator() {
    // An S3-compatible store with keys from a Secret.
    let objs = objects(&render(&[&ci_values("s3-values.yaml")], &[]).unwrap());
    let (args, config) = coordinator_args(&objs, "10.0.0.7");
    assert!(args.contains(&"--object-store=s3://gantry-checkpoints/cluster-a".to_string()), "{args:?}");
    assert_eq!(config["AWS_ENDPOINT_URL"], "http://minio.storage:9000");
    assert_eq!(config["AWS_REGION"], "eu-west-1");
    assert_eq!(config["AWS_ALLOW_HTTP"], "true");
    let keys = secret_env(&objs);
    assert_eq!(keys["AWS_ACCESS_KEY_ID"], ("gantry-s3".to_string(), "AWS_ACCESS_KEY_ID".to_string()));
    assert_eq!(keys["AWS_SECRET_ACCESS_KEY"], ("gantry-s3".to_string(), "AWS_SECRET_ACCESS_KEY".to_string()));

    // AWS S3 with the pods' IAM role: no keys, no endpoint, the role on the ServiceAccount.
    let ha = objects(&render(&[&ci_values("ha-etcd-values.yaml")], &[]).unwrap());
    let (args, config) = coordinator_args(&ha, "10.0.0.7");
    assert!(args.contains(&"--object-store=s3://gantry-checkpoints".to_string()), "{args:?}");
    assert!(!config.keys().any(|k| k.starts_with("AWS_")), "{config:?}");
    assert!(secret_env(&ha).is_empty());
    let role = &ha["ServiceAccount/t-gantry"]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"];
    assert_eq!(role, "arn:aws:iam::123456789012:role/gantry");
}

/// The coordinator's environment variables taken from Secrets: name -> (secret, key).
fn secret_env(objs: &BTreeMap<String, Value>) -> BTreeMap<String, (String, String)> {
    let container = &objs["StatefulSet/t-gantry"]["spec"]["template"]["spec"]["containers"][0];
    container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|e| {
            let secret = &e["valueFrom"]["secretKeyRef"];
            let name = secret["name"].as_str()?.to_string();
            Some((e["name"].as_str().unwrap().to_string(), (name, secret["key"].as_str().unwrap().to_string())))
        })
        .collect()
}

/// The real `gantry` binary, started with exactly the arguments and environment the chart
/// gives the coordinator (`secrets` stand in for the Secrets it names), on free ports.
struct ChartCoordinator {
    child: std::process::Child,
    objs: BTreeMap<String, Value>,
    _data: tempfile::TempDir,
    _tokens: tempfile::TempDir,
    /// The CA Secret's files, as the chart made them.
    ca: tempfile::TempDir,
}

/// Standard base64, as Secrets' data are written.
fn base64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|c| *c != b'=' && !c.is_ascii_whitespace()) {
        let v = ALPHABET.iter().position(|a| *a == c).expect("base64") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

impl ChartCoordinator {
    fn start(values: &[&str], set: &[&str], secrets: &BTreeMap<String, String>) -> ChartCoordinator {
        let (grpc, http) = (free_port(), free_port());
        let ports = [format!("coordinator.grpcPort={grpc}"), format!("coordinator.httpPort={http}")];
        let set: Vec<&str> = set.iter().copied().chain(ports.iter().map(String::as_str)).collect();
        let objs = objects(&render(values, &set).unwrap());
        let container = &objs["StatefulSet/t-gantry"]["spec"]["template"]["spec"]["containers"][0];
        let (args, mut env) = coordinator_args(&objs, "127.0.0.1");
        for (name, (_, key)) in secret_env(&objs) {
            env.insert(name, secrets.get(&key).unwrap_or_else(|| panic!("no secret value for {key}")).clone());
        }
        let data = tempfile::tempdir().unwrap();
        let mount_of = |volume: &str| {
            let mounts = container["volumeMounts"].as_sequence().unwrap();
            mounts.iter().find(|m| m["name"] == volume).unwrap()["mountPath"].as_str().unwrap().to_string()
        };
        // The tokens Secret's files, with the values given or fresh ones.
        let tokens = tempfile::tempdir().unwrap();
        for key in ["admin-token", "agent-token", "metrics-token"] {
            let value = secrets.get(key).cloned().unwrap_or_else(support::test_secret);
            std::fs::write(tokens.path().join(key), value).unwrap();
        }
        // The CA Secret the chart made (helm's genCA), as files.
        let ca = tempfile::tempdir().unwrap();
        for key in ["ca.crt", "ca.key"] {
            let value = objs["Secret/t-gantry-ca"]["data"][key].as_str().expect("the chart makes a CA");
            std::fs::write(ca.path().join(key), base64_decode(value)).unwrap();
        }
        let (data_mount, tokens_mount, ca_mount) = (mount_of("data"), mount_of("tokens"), mount_of("ca"));
        let args: Vec<String> = args
            .into_iter()
            .map(|a| a.replace(&data_mount, data.path().to_str().unwrap()))
            .map(|a| a.replace(&tokens_mount, tokens.path().to_str().unwrap()))
            .map(|a| a.replace(&ca_mount, ca.path().to_str().unwrap()))
            .collect();
        let child = Command::new(env!("CARGO_BIN_EXE_gantry"))
            .args(&args)
            .envs(&env)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("gantry starts");
        ChartCoordinator { child, objs, _data: data, _tokens: tokens, ca }
    }

    fn container(&self) -> &Value {
        &self.objs["StatefulSet/t-gantry"]["spec"]["template"]["spec"]["containers"][0]
    }

    /// Every probe's answer, once the coordinator listens.
    fn probe(&mut self) -> Vec<(String, u16, String)> {
        let container = self.container().clone();
        let ports = self.ports();
        let mut answers = Vec::new();
        for probe in ["readinessProbe", "livenessProbe"] {
            let get = &container[probe]["httpGet"];
            let port = ports[get["port"].as_str().unwrap()] as u16;
            let path = get["path"].as_str().unwrap();
            assert_eq!(get["scheme"], "HTTPS", "{probe}");
            let web = self.web(port);
            let deadline = Instant::now() + Duration::from_secs(20);
            let answer = loop {
                match http_get(&web, path) {
                    Ok(answer) => break answer,
                    Err(e) if Instant::now() > deadline => panic!("{probe} {path} on port {port}: {e}"),
                    Err(_) => {
                        if let Some(status) = self.child.try_wait().unwrap() {
                            let mut err = String::new();
                            std::io::Read::read_to_string(self.child.stderr.as_mut().unwrap(), &mut err).unwrap();
                            panic!("the coordinator exited ({status}):\n{err}");
                        }
                        std::thread::sleep(Duration::from_millis(100))
                    }
                }
            };
            answers.push((probe.to_string(), answer.0, path.to_string()));
        }
        answers
    }

    /// The coordinator's HTTPS side on `port`, trusted by the chart's CA.
    fn web(&self, port: u16) -> support::Web {
        support::Web { port, ca: Some(self.ca.path().join("ca.crt")) }
    }

    fn ports(&self) -> BTreeMap<String, u64> {
        self.container()["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|p| (p["name"].as_str().unwrap().to_string(), p["containerPort"].as_u64().unwrap()))
            .collect()
    }
}

impl Drop for ChartCoordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The probes point at real endpoints of the real binary.
#[test]
fn the_coordinator_started_as_the_chart_starts_it_answers_its_probes() {
    let mut coordinator = ChartCoordinator::start(&[], &[], &BTreeMap::new());
    for (probe, code, path) in coordinator.probe() {
        assert_eq!(code, 200, "{probe}: {path} answered {code}");
    }
    // The gRPC port the Service names is the one the coordinator listens on.
    let grpc = coordinator.ports()["grpc"] as u16;
    assert!(std::net::TcpStream::connect(("127.0.0.1", grpc)).is_ok());
    // The CA the chart made is what the coordinator serves under: gRPC over TLS, trusted by it.
    let cli = support::Cli {
        url: format!("https://127.0.0.1:{grpc}"),
        dir: coordinator.ca.path().to_path_buf(),
        log: None,
        token: None,
        ca: Some(coordinator.ca.path().join("ca.crt")),
        netns: None,
    };
    let out = cli.gantry(&["jobs"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no token"), "TLS works and the token is asked for: {err}");
}

/// The chart's coordinator serves with tokens: its Secret's metrics token reads /metrics (as
/// the ServiceMonitor scrapes it), nothing else does, and agents get the agent token.
#[test]
fn the_charts_coordinator_takes_its_tokens_from_the_secret() {
    let metrics_token = support::test_secret();
    let secrets = BTreeMap::from([("metrics-token".to_string(), metrics_token.clone())]);
    let mut coordinator = ChartCoordinator::start(&[], &["serviceMonitor.enabled=true"], &secrets);
    coordinator.probe();
    let http = coordinator.web(coordinator.ports()["http"] as u16);
    assert_eq!(http_get(&http, "/metrics").unwrap().0, 401);
    let (code, text) = support::http_get_as(&http, "/metrics", &metrics_token).unwrap();
    assert!(code == 200 && text.contains("gantry_jobs{"), "{code}: {text}");
    let host = ["Host: t-gantry.default.svc:7080", &format!("Authorization: Bearer {metrics_token}")];
    assert_eq!(support::http_request(&http, "GET", "/metrics", &host, "").unwrap().0, 200, "the Service's name");

    let objs = &coordinator.objs;
    let endpoint = &objs["ServiceMonitor/t-gantry"]["spec"]["endpoints"][0];
    let monitor = &endpoint["authorization"]["credentials"];
    assert_eq!((monitor["name"].as_str(), monitor["key"].as_str()), (Some("t-gantry-tokens"), Some("metrics-token")));
    assert_eq!(endpoint["scheme"], "https");
    let trusted = &endpoint["tlsConfig"]["ca"]["secret"];
    assert_eq!((trusted["name"].as_str(), trusted["key"].as_str()), (Some("t-gantry-ca"), Some("ca.crt")));
    let agent = &objs["DaemonSet/t-gantry-agent"]["spec"]["template"]["spec"]["containers"][0];
    assert!(strings(&agent["args"]).contains(&"--ca=/etc/gantry/ca/ca.crt".to_string()));
    let volumes = &objs["DaemonSet/t-gantry-agent"]["spec"]["template"]["spec"]["volumes"];
    let ca_volume = volumes.as_sequence().unwrap().iter().find(|v| v["name"] == "ca").unwrap();
    assert_eq!(
        ca_volume["secret"]["items"].as_sequence().unwrap().len(),
        1,
        "agents get the CA's certificate, not its key"
    );
    let join = agent["env"].as_sequence().unwrap().iter().find(|e| e["name"] == "GANTRY_JOIN_TOKEN").unwrap();
    assert_eq!(join["valueFrom"]["secretKeyRef"]["key"], "agent-token");
    let secret = &objs["Secret/t-gantry-tokens"]["data"];
    for key in ["admin-token", "agent-token", "metrics-token"] {
        assert!(secret[key].as_str().is_some_and(|v| v.len() >= 48), "a random {key}");
    }
}

/// With the S3 value set pointed at a real S3 server, the coordinator opens the bucket and
/// serves; with a bucket that does not exist it stops at once and says why.
#[cfg(feature = "s3")]
#[test]
fn the_coordinator_started_with_the_charts_s3_settings_uses_a_real_s3_server() {
    let s3 = s3_server::S3Server::start("gantry-checkpoints");
    let endpoint = format!("objectStore.endpoint={}", s3.endpoint());
    let secrets: BTreeMap<String, String> =
        s3.env().into_iter().filter(|(k, _)| k.starts_with("AWS_ACCESS") || k.starts_with("AWS_SECRET")).collect();
    let mut coordinator = ChartCoordinator::start(&[&ci_values("s3-values.yaml")], &[&endpoint], &secrets);
    for (probe, code, path) in coordinator.probe() {
        assert_eq!(code, 200, "{probe}: {path} answered {code}");
    }

    let mut missing = ChartCoordinator::start(
        &[&ci_values("s3-values.yaml")],
        &[&endpoint, "objectStore.url=s3://no-such-bucket"],
        &secrets,
    );
    let status = missing.child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(missing.child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("s3://no-such-bucket") && err.contains("NoSuchBucket"), "{err}");
}

/// The image the chart runs is the one the repository's Dockerfile builds and the compose fleet
/// runs (`containers.rs` builds it under this tag and runs it): `gantry:<version>`, whose
/// entrypoint is the `gantry` binary, so the chart's arguments start with a subcommand.
#[test]
fn the_chart_runs_the_image_the_dockerfile_builds() {
    let objs = objects(&render(&[], &[]).unwrap());
    let want = format!("gantry:{}", env!("CARGO_PKG_VERSION"));
    for (workload, subcommand) in [("StatefulSet/t-gantry", "coordinator"), ("DaemonSet/t-gantry-agent", "agent")] {
        let container = &objs[workload]["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["image"].as_str(), Some(want.as_str()), "{workload}");
        assert_eq!(strings(&container["args"])[0], subcommand, "{workload}");
    }
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains(r#"ENTRYPOINT ["/usr/local/bin/gantry"]"#), "the image's entrypoint is gantry");
    let compose = std::fs::read_to_string(repo_root().join("compose/compose.yaml")).unwrap();
    assert!(compose.contains(&format!("image: {want}")), "compose runs {want}");
}
