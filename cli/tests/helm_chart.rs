//! The Helm chart (`charts/gantry`), with a real helm and offline Kubernetes schemas: it lints,
//! renders with every value set, validates against Kubernetes 1.30 and 1.33, refuses bad
//! values, and what it renders means what an operator needs (GPU nodes only, probes on real
//! endpoints, the store's settings in the coordinator's arguments). `.ci/run` installs helm and
//! kubernetes-validate; `HELM` and `KUBERNETES_VALIDATE` may name them.

mod support;

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
    let sets = ["", "ha-etcd-values.yaml", "external-etcd-values.yaml", "cpu-agents-values.yaml"];
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
    assert!(args.contains(&"--coordinator=http://t-gantry:7070".to_string()), "{args:?}");
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
    assert!(!args.iter().any(|a| a.starts_with("--etcd")), "{args:?}");
}

/// The real `gantry` binary, started with exactly the arguments and environment the chart
/// gives the coordinator, serves what the probes ask for.
#[test]
fn the_coordinator_started_as_the_chart_starts_it_answers_its_probes() {
    let (grpc, http) = (free_port(), free_port());
    let objs = objects(
        &render(&[], &[&format!("coordinator.grpcPort={grpc}"), &format!("coordinator.httpPort={http}")]).unwrap(),
    );
    let container = &objs["StatefulSet/t-gantry"]["spec"]["template"]["spec"]["containers"][0];
    let (args, config) = coordinator_args(&objs, "127.0.0.1");
    let data = tempfile::tempdir().unwrap();
    let mount = container["volumeMounts"].as_sequence().unwrap().iter().find(|m| m["name"] == "data").unwrap();
    let mount = mount["mountPath"].as_str().unwrap();
    let args: Vec<String> = args.into_iter().map(|a| a.replace(mount, data.path().to_str().unwrap())).collect();
    let mut child =
        Command::new(env!("CARGO_BIN_EXE_gantry")).args(&args).envs(&config).spawn().expect("gantry starts");

    let ports: BTreeMap<String, u64> = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_string(), p["containerPort"].as_u64().unwrap()))
        .collect();
    for probe in ["readinessProbe", "livenessProbe"] {
        let get = &container[probe]["httpGet"];
        let port = ports[get["port"].as_str().unwrap()] as u16;
        let path = get["path"].as_str().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let answer = loop {
            match http_get(port, path) {
                Ok(answer) => break answer,
                Err(e) if Instant::now() > deadline => panic!("{probe} {path} on port {port}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        assert_eq!(answer.0, 200, "{probe}: {path} answered {answer:?}");
    }
    // The gRPC port the Service names is the one the coordinator listens on.
    assert_eq!(ports["grpc"], u64::from(grpc));
    assert!(std::net::TcpStream::connect(("127.0.0.1", grpc)).is_ok());
    child.kill().unwrap();
    child.wait().unwrap();
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
