//! Secure by default, with real processes: a coordinator started with no security flags refuses
//! token-less clients and agents, keeps users to their own jobs, and keeps no secret in clear.

mod support;

use std::time::{Duration, Instant};

use support::{Fleet, GANTRY};

const SLEEPER: &str = "name: quiet\ncommand: [\"sleep\", \"60\"]\nenv: {API_KEY: hunter2-secret}\n";

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn clients_and_agents_without_a_valid_token_are_refused() {
    let mut fleet = Fleet::start();
    for (token, why) in [(None, "no token"), (Some("gantry_0000000000000000000000000000"), "not valid")] {
        let out = fleet.cli_as(token).gantry(&["jobs"]);
        assert!(!out.status.success(), "gantry jobs with {token:?} succeeded");
        assert!(stderr(&out).contains(why), "{token:?}: {}", stderr(&out));
    }
    // A user's token is not an agent's: neither it nor no token lets a machine join.
    let user = fleet.token("alice", "user");
    fleet.start_agent_with("no-token", &["--join-token", ""]);
    fleet.start_agent_with("user-token", &["--join-token", &user]);
    std::thread::sleep(Duration::from_secs(3));
    let nodes = fleet.json(&["nodes"]);
    let names: Vec<&str> = nodes.as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["node-a"], "only the agent with the join token registered");
    let log = std::fs::read_to_string(fleet.dir.path().join("user-token.log")).unwrap();
    assert!(log.contains("act as an agent"), "the agent says why it was refused:\n{log}");

    // HTTPS: /healthz is open, the rest needs a token.
    assert_eq!(support::http_get(&fleet.web(), "/healthz").unwrap().0, 200);
    assert_eq!(support::http_get(&fleet.web(), "/metrics").unwrap().0, 401);
    assert_eq!(support::http_get(&fleet.web(), "/api/jobs").unwrap().0, 401);
    let viewer = fleet.token("grafana", "viewer");
    let (code, metrics) = support::http_get_as(&fleet.web(), "/metrics", &viewer).unwrap();
    assert!(code == 200 && metrics.contains("gantry_jobs{"), "{code}: {metrics}");
    let (code, head, _) = support::http_exchange(&fleet.web(), "GET", "/", &[], "").unwrap();
    assert!(code == 303 && head.contains("location: /login"), "the page sends people to log in:\n{head}");
    // The login form sets an HttpOnly, SameSite=Strict cookie, which then opens the page's API.
    let form = format!("token={viewer}&next=/");
    let form_type = "Content-Type: application/x-www-form-urlencoded";
    let (code, head, _) = support::http_exchange(&fleet.web(), "POST", "/login", &[form_type], &form).unwrap();
    assert_eq!(code, 303, "{head}");
    let cookie = head.lines().find_map(|l| l.strip_prefix("set-cookie: ")).expect("a cookie").to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict") && cookie.contains("Secure"), "{cookie}");
    let session = cookie.split(';').next().unwrap();
    let (code, _) =
        support::http_request(&fleet.web(), "GET", "/api/jobs", &[&format!("Cookie: {session}")], "").unwrap();
    assert_eq!(code, 200);
    let (code, _) =
        support::http_request(&fleet.web(), "POST", "/login", &[form_type], "token=wrong-token-000000").unwrap();
    assert_eq!(code, 401);
    // DNS rebinding: a page of another site pointing its name at this machine is refused, and
    // no other site's page may post to it.
    let (code, _) = support::http_request(&fleet.web(), "GET", "/healthz", &["Host: attacker.example:80"], "").unwrap();
    assert_eq!(code, 200, "probes come by any name");
    let evil_host = ["Host: attacker.example", &format!("Cookie: {session}")];
    assert_eq!(support::http_request(&fleet.web(), "GET", "/api/jobs", &evil_host, "").unwrap().0, 403);
    let evil_origin = [form_type, "Origin: http://attacker.example"];
    assert_eq!(support::http_request(&fleet.web(), "POST", "/login", &evil_origin, &form).unwrap().0, 403);
}

#[test]
fn users_reach_only_their_own_jobs_and_viewers_only_look() {
    let fleet = Fleet::start();
    let alice = fleet.cli_as(Some(&fleet.token("alice", "user")));
    let bob = fleet.cli_as(Some(&fleet.token("bob", "user")));
    let viewer = fleet.cli_as(Some(&fleet.token("dashboard", "viewer")));
    let id = alice.submit(SLEEPER);
    alice.wait_state(&id, &["running"], Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));

    // Bob sees the queue, with the owner, and not alice's env values.
    let listed = bob.json(&["jobs"]);
    let job = listed.as_array().unwrap().iter().find(|j| j["id"] == id.as_str()).unwrap();
    assert_eq!(job["owner"], "alice", "{job}");
    assert!(bob.ok(&["jobs"]).contains("alice"));
    let out_dir = fleet.dir.path().join("stolen");
    let out_dir = out_dir.to_str().unwrap();
    for cli in [&bob, &viewer] {
        for args in [
            vec!["job", &id],
            vec!["logs", &id],
            vec!["checkpoints", &id],
            vec!["cancel", &id],
            vec!["checkpoint", "download", &id, "--out", out_dir],
        ] {
            let out = cli.gantry(&args);
            assert!(!out.status.success(), "{args:?} was allowed");
            assert!(stderr(&out).contains("permission denied"), "{args:?}: {}", stderr(&out));
        }
    }
    let out = viewer.gantry(&["submit", &write(&fleet, "v.yaml", SLEEPER)]);
    assert!(stderr(&out).contains("permission denied") && stderr(&out).contains("submit"), "{}", stderr(&out));
    for args in [["drain", "node-a"], ["token", "list"]] {
        let out = bob.gantry(&args);
        assert!(stderr(&out).contains("permission denied"), "{args:?}: {}", stderr(&out));
    }
    assert_eq!(alice.state(&id), "running", "nothing bob tried touched it");
    assert!(!fleet.dir.path().join("stolen").exists());

    // The owner and admins see the job.
    assert_eq!(alice.json(&["job", &id])["owner"], "alice");
    assert_eq!(fleet.json(&["job", &id])["owner"], "alice");
    alice.ok(&["cancel", &id]);
    fleet.wait_state(&id, &["cancelled"], Duration::from_secs(30));

    // Every change is in the audit log with who made it.
    let log = fleet.coordinator_log();
    let audit: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["target"] == "gantry::audit")
        .collect();
    let seen: Vec<(String, String)> = audit
        .iter()
        .map(|l| (l["fields"]["user"].as_str().unwrap().into(), l["fields"]["action"].as_str().unwrap().into()))
        .collect();
    for want in [("admin", "token create"), ("alice", "submit"), ("alice", "cancel")] {
        assert!(seen.iter().any(|(u, a)| (u.as_str(), a.as_str()) == want), "{want:?} not audited: {seen:?}");
    }
    assert!(!seen.iter().any(|(u, _)| u == "bob"), "bob changed nothing: {seen:?}");
}

fn write(fleet: &Fleet, name: &str, text: &str) -> String {
    let path = fleet.dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn a_revoked_token_stops_at_once_and_no_secret_is_kept_in_clear() {
    let fleet = Fleet::start();
    let secret = fleet.token("ci-bot", "user");
    let ci = fleet.cli_as(Some(&secret));
    let id = ci.submit("name: quick\ncommand: [\"true\"]\n");
    let listed = fleet.json(&["token", "list"]);
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["admin", "agents", "ci-bot"], "{listed}");
    assert!(!listed.to_string().contains(&secret), "the list never shows a secret");

    fleet.ok(&["token", "revoke", "ci-bot"]);
    let out = ci.gantry(&["job", &id]);
    assert!(!out.status.success() && stderr(&out).contains("not valid"), "{}", stderr(&out));
    let out = ci.gantry(&["token", "create", "x", "--role", "admin"]);
    assert!(!out.status.success());

    // A token with a lifetime, and one that has none left.
    let short = fleet.json(&["token", "create", "temp", "--role", "viewer", "--ttl", "1s"]);
    let temp = fleet.cli_as(short["secret"].as_str());
    temp.ok(&["jobs"]);
    std::thread::sleep(Duration::from_millis(1200));
    assert!(!temp.gantry(&["jobs"]).status.success(), "expired");

    // Nothing the coordinator or the agent keeps or logs holds a secret.
    let mut places = vec![fleet.data_dir().join("state.redb"), fleet.dir.path().join("coordinator.log")];
    places.push(fleet.dir.path().join("node-a.log"));
    for path in places {
        let bytes = std::fs::read(&path).unwrap();
        for s in [&secret, &fleet.admin_token, &fleet.agent_token] {
            assert!(!contains(&bytes, s.as_bytes()), "{} holds a secret in clear", path.display());
        }
    }
    // An agent's open session ends with its token: revoked, the node drops out and stays out.
    fleet.ok(&["token", "revoke", "agents"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while fleet.json(&["nodes"])[0]["connected"] == true {
        assert!(Instant::now() < deadline, "the agent's session outlived its revoked token");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(fleet.json(&["nodes"])[0]["connected"], false, "the agent came back without a valid token");
    // The admin token's file is its owner's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(fleet.data_dir().join("admin-token")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn login_keeps_the_token_for_that_coordinator_only() {
    let fleet = Fleet::start();
    let secret = fleet.token("carol", "user");
    let carol = fleet.cli_as(None);
    let out = carol.ok(&["login", &fleet.url(), "--token", &secret]);
    assert!(out.contains("as carol (user)"), "{out}");
    let file = fleet.dir.path().join("config/gantry/login.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    // Later commands need no token, and no coordinator either: the login names it.
    let id = carol.submit("name: after-login\ncommand: [\"true\"]\n");
    let plain = std::process::Command::new(GANTRY)
        .args(["job", &id, "-o", "json"])
        .env_remove("GANTRY_COORDINATOR")
        .env_remove("GANTRY_TOKEN")
        .env_remove("GANTRY_CA")
        .env("XDG_CONFIG_HOME", fleet.dir.path().join("config"))
        .output()
        .unwrap();
    assert!(plain.status.success(), "{}", stderr(&plain));
    // The kept token is not sent to another coordinator.
    let elsewhere = std::process::Command::new(GANTRY)
        .args(["jobs", "--coordinator", &format!("https://localhost:{}", fleet.grpc)])
        .env("GANTRY_CA", fleet.ca())
        .env_remove("GANTRY_TOKEN")
        .env("XDG_CONFIG_HOME", fleet.dir.path().join("config"))
        .output()
        .unwrap();
    assert!(stderr(&elsewhere).contains("no token"), "{}", stderr(&elsewhere));
    assert!(!carol.gantry(&["login", &fleet.url(), "--token", "gantry_wrong0000000000000000"]).status.success());
}

#[test]
fn without_auth_only_on_loopback_and_saying_so() {
    for args in [
        vec!["coordinator", "--insecure", "--listen", "0.0.0.0:0", "--http", "127.0.0.1:0"],
        vec!["dev", "--listen", "127.0.0.1:0", "--http", "0.0.0.0:0"],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let out = std::process::Command::new(GANTRY).args(&args).arg("--data-dir").arg(dir.path()).output().unwrap();
        assert!(!out.status.success(), "{args:?} started");
        assert!(stderr(&out).contains("loopback only"), "{args:?}: {}", stderr(&out));
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    // On loopback it starts, and its first line says what it is.
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(GANTRY)
        .args(["coordinator", "--insecure", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stderr.take().unwrap()), &mut first).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(first.contains("--insecure") && first.contains("no auth"), "{first}");
    assert!(!dir.path().join("admin-token").exists(), "no token without auth");
    assert!(!dir.path().join("tls").exists(), "no certificates without TLS");
}

#[test]
fn agents_join_once_then_prove_who_they_are_with_their_certificate() {
    use gantry_proto::{ClientTls, PROTOCOL_VERSION, v1};
    let mut fleet = Fleet::start();
    // Plaintext finds nothing to talk to: gRPC and HTTP are TLS only.
    let plain = fleet.cli().gantry(&["jobs", "--coordinator", &format!("http://127.0.0.1:{}", fleet.grpc)]);
    assert!(!plain.status.success(), "a plaintext client was served");
    let http = support::http_get(&support::Web::plain(fleet.http), "/healthz");
    assert!(http.map_or(true, |(code, _)| code != 200), "plain HTTP was served");
    // Without --ca, a client does not trust the coordinator's certificate.
    let mut untrusting = fleet.cli();
    untrusting.ca = None;
    assert!(!untrusting.gantry(&["jobs"]).status.success());

    // The agent joined with its token: a key only it reads, and a certificate for its name.
    let tls_dir = fleet.work_dir("node-a").join("tls");
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&tls_dir.join("agent.key")), 0o600);
    assert_eq!(mode(&tls_dir), 0o700);
    let identity = (
        std::fs::read_to_string(tls_dir.join("agent.crt")).unwrap(),
        std::fs::read_to_string(tls_dir.join("agent.key")).unwrap(),
    );
    let ca = std::fs::read_to_string(fleet.ca()).unwrap();
    let url = fleet.url();
    let register = |tls: ClientTls, name: &'static str| {
        let url = url.clone();
        tokio::runtime::Runtime::new().unwrap().block_on(async move {
            let channel = gantry_proto::endpoint(&url, &tls).unwrap().connect().await.unwrap();
            let mut client = v1::agents_client::AgentsClient::new(channel);
            let request = v1::RegisterRequest {
                protocol_version: PROTOCOL_VERSION,
                name: name.into(),
                inventory: Some(v1::Inventory { hostname: name.into(), cpus: 1, ..Default::default() }),
                ..Default::default()
            };
            client.register(request).await.map(|_| ())
        })
    };
    // No certificate: refused, even with TLS.
    let e = register(ClientTls { ca_pem: Some(ca.clone()), identity: None }, "intruder").unwrap_err();
    assert!(e.code() == tonic::Code::Unauthenticated && e.message().contains("client certificate"), "{e:?}");
    // node-a's certificate is node-a's only.
    let e = register(ClientTls { ca_pem: Some(ca.clone()), identity: Some(identity.clone()) }, "node-b").unwrap_err();
    assert!(e.code() == tonic::Code::PermissionDenied && e.message().contains("node-a"), "{e:?}");

    // A restart needs no token: the certificate is kept.
    let mut agent = fleet.agents.remove(0);
    agent.kill().unwrap();
    agent.wait().unwrap();
    fleet.start_agent_with("node-a", &["--join-token", ""]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while fleet.json(&["nodes"])[0]["connected"] != true {
        assert!(Instant::now() < deadline, "the agent did not come back with its certificate");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Removing the node ends its certificate at once, though the token it joined with is
    // valid; the agent, started without one this time, cannot come back.
    let removed = fleet.json(&["remove-node", "node-a"]);
    assert_eq!(removed["certificates"], 1, "{removed}");
    let e = register(ClientTls { ca_pem: Some(ca.clone()), identity: Some(identity) }, "node-a").unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(fleet.json(&["nodes"]), serde_json::json!([]), "the removed node stayed out");

    // Revoking a token ends every certificate issued with it.
    let joined = tokio::runtime::Runtime::new().unwrap().block_on(fleet.join_as("node-z"));
    register(joined.clone(), "node-z").unwrap();
    fleet.ok(&["token", "revoke", "agents"]);
    let e = register(joined, "node-z").unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
}

#[test]
fn a_checkpoint_carries_no_file_from_outside_its_directory() {
    let fleet = Fleet::start();
    let secret = fleet.dir.path().join("agent-private-key");
    std::fs::write(&secret, "the contents no job may take").unwrap();
    // A job that commits a checkpoint holding a symlink to a file outside it.
    let script = format!(
        "set -e; d=\"$GANTRY_CHECKPOINT_DIR/.tmp-step-1\"; mkdir -p \"$d\"; echo weights > \"$d/model.bin\"; \
         ln -s {} \"$d/key\"; mv \"$d\" \"$GANTRY_CHECKPOINT_DIR/step-1\"; sleep 3",
        secret.display()
    );
    let spec = format!("name: sneaky\ncommand: [\"sh\", \"-c\", {}]\n", serde_json::to_string(&script).unwrap());
    let id = fleet.submit(&spec);
    fleet.wait_state(&id, &["succeeded", "failed"], Duration::from_secs(60));
    let checkpoints = fleet.json(&["checkpoints", &id]);
    let files = &checkpoints[0]["files"];
    let paths: Vec<&str> = files.as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["model.bin"], "{checkpoints}");
    let out = fleet.dir.path().join("downloaded");
    fleet.ok(&["checkpoint", "download", &id, "--out", out.to_str().unwrap()]);
    assert!(!out.join("key").exists());
    let logs = fleet.ok(&["logs", &id]);
    assert!(logs.contains("`key` is a symlink, left out"), "the job's log names it:\n{logs}");
    for entry in walk(&fleet.data_dir()) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(!contains(&bytes, b"the contents no job may take"), "{} holds the file", entry.display());
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() { out.extend(walk(&path)) } else { out.push(path) }
    }
    out
}

/// The coordinator's resident memory, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB");
    kb.trim().parse::<u64>().unwrap() * 1024
}

#[test]
fn oversized_specs_and_messages_are_refused_without_the_coordinator_growing() {
    use gantry_proto::v1;
    let fleet = Fleet::start();
    let pid = fleet.coordinator.as_ref().unwrap().id();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let url = fleet.url();
    let token = fleet.admin_token.clone();
    let tls = fleet.client_tls();
    let small = gantry_core::JobSpec::from_yaml("name: big\ncommand: [\"true\"]\n").unwrap();
    let (before, after, codes) = runtime.block_on(async move {
        let channel = gantry_proto::endpoint(&url, &tls).unwrap().connect().await.unwrap();
        let bearer = gantry_proto::Bearer::new(Some(&token)).unwrap();
        let mut client = v1::gantry_client::GantryClient::with_interceptor(channel, bearer);
        let submit = |env_value: usize| {
            let mut spec = v1::JobSpec::from(&small);
            spec.env.insert("BLOB".into(), "x".repeat(env_value));
            v1::SubmitRequest { spec: Some(spec) }
        };
        // Warm up the connection and the allocator with one ordinary submit.
        client.submit(submit(10)).await.unwrap();
        let before = rss_bytes(pid);
        let mut codes = Vec::new();
        for _ in 0..8 {
            let e = client.submit(submit(48 << 20)).await.unwrap_err();
            codes.push((e.code(), e.message().to_string()));
        }
        // Under the message limit but over the spec's: refused by the spec's rules.
        let e = client.submit(submit(40 << 10)).await.unwrap_err();
        codes.push((e.code(), e.message().to_string()));
        (before, rss_bytes(pid), codes)
    });
    for (code, message) in &codes[..8] {
        // tonic answers OUT_OF_RANGE for a message over the decoding limit.
        assert_eq!(*code, tonic::Code::OutOfRange, "{message}");
        assert!(message.contains("4194304"), "the error names the limit: {message}");
    }
    let (code, message) = &codes[8];
    assert!(*code == tonic::Code::InvalidArgument && message.contains("env.BLOB"), "{code:?}: {message}");
    // 384 MiB were sent; had any message been read whole, memory would have grown by 48 MiB.
    assert!(after < before + (32 << 20), "resident memory grew from {before} to {after} bytes");
    assert_eq!(fleet.json(&["jobs"]).as_array().unwrap().len(), 1, "only the ordinary submit queued");
}

#[test]
fn jobs_run_unprivileged_in_their_own_cgroup_and_a_memory_kill_is_named() {
    // Switching users and making cgroups need root; the tests (and CI) run as root, so the agent
    // here isolates its jobs as it would on a GPU node.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root, as the agent does to isolate jobs");
    let fleet = Fleet::start();
    let secret = fleet.dir.path().join("root-only.txt");
    std::fs::write(&secret, "root's secret").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();

    let spec = format!(
        "name: who\nresources: {{cpus: 1, memory_gb: 1}}\ncommand: [\"sh\", \"-c\", \"echo uid=$(id -u); grep memory /proc/self/cgroup; cat {} || echo refused\"]\n",
        secret.display()
    );
    let id = fleet.submit(&spec);
    assert_eq!(fleet.wait_state(&id, &["succeeded", "failed"], Duration::from_secs(30)), "succeeded");
    let logs = fleet.ok(&["logs", &id]);
    assert!(logs.contains("uid=65534"), "the job runs as nobody, not root:\n{logs}");
    assert!(
        logs.contains("/gantry/agent-") && logs.contains(&format!("/job-{id}-1-0")),
        "in its own memory cgroup:\n{logs}"
    );
    assert!(logs.contains("refused") && !logs.contains("root's secret"), "{logs}");

    // 3 GiB touched under a 1 GiB limit: the kernel kills it, and the job says why.
    let hog = fleet.submit(
        "name: hog\nresources: {cpus: 1, memory_gb: 1}\nmax_restarts: 0\ncommand: [\"python3\", \"-c\", \"b = bytearray(3 << 30); print('survived')\"]\n",
    );
    assert_eq!(fleet.wait_state(&hog, &["succeeded", "failed"], Duration::from_secs(60)), "failed");
    let shown = fleet.ok(&["job", &hog]);
    assert!(shown.contains("out of memory (memory_gb: 1)"), "{shown}");
    let logs = fleet.ok(&["logs", &hog]);
    assert!(!logs.contains("survived"), "{logs}");
    // The cgroups are gone with their jobs.
    let memory_root = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let own = memory_root.lines().find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string())).unwrap();
    let ours = std::path::Path::new("/sys/fs/cgroup/memory").join(own.trim_start_matches('/')).join("gantry");
    for agent in std::fs::read_dir(&ours).unwrap() {
        let left = agent.unwrap().path().join(format!("job-{hog}-1-0"));
        assert!(!left.exists(), "{} is left behind", left.display());
    }
}
