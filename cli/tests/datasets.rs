//! Pushed data sets with real processes: `gantry dataset push`, jobs that name them as
//! `dataset://NAME/PATH`, and the agent's cache: fetched once and shared by jobs, kept across an
//! agent restart, fetched again when a cached file is corrupted. And `s3://` paths in the
//! coordinator's bucket (moto's S3 server, with the `s3` feature), read and pinned at submit.

#[cfg(feature = "s3")]
#[path = "support/s3_server.rs"]
mod s3_server;
mod support;

use std::time::Duration;

#[cfg(feature = "s3")]
use support::free_port;
use support::{Fleet, repo_root};

/// Trains the wine MLP on `table` to the end; the job's id and its logs.
fn train_on(fleet: &Fleet, table: &str) -> (String, String) {
    let spec = format!(
        "name: wine\nresources: {{gpus: 0, cpus: 1, memory_gb: 1}}\nmax_restarts: 0\ntrain:\n  \
         model: {{kind: mlp, hidden: [32]}}\n  dataset: {{table: '{table}', label: cultivar}}\n  \
         epochs: 8\n  batch_size: 16\n  learning_rate: 0.003\n"
    );
    let id = fleet.submit(&spec);
    let state = fleet.wait_state(&id, &["succeeded", "failed"], Duration::from_secs(180));
    let logs = fleet.ok(&["logs", &id]);
    assert_eq!(state, "succeeded", "{logs}");
    (id, logs)
}

/// The held-out accuracy of the job's `done` line.
fn accuracy(logs: &str) -> f64 {
    let done = logs.lines().find(|l| l.starts_with("done ")).unwrap_or_else(|| panic!("no done line:\n{logs}"));
    let field = done.split_whitespace().find_map(|w| w.strip_prefix("test_accuracy=")).unwrap();
    field.parse().unwrap()
}

#[test]
fn a_pushed_table_is_fetched_once_shared_kept_across_an_agent_restart_and_fetched_again_when_corrupt() {
    let mut fleet = Fleet::start();
    let wine = repo_root().join("examples/wine/wine.csv");
    let size = std::fs::metadata(&wine).unwrap().len();
    let said = fleet.ok(&["dataset", "push", "wine", wine.to_str().unwrap()]);
    assert!(said.contains("pushed wine@") && said.contains("jobs name it as dataset://wine/wine.csv"), "{said}");
    let listed = fleet.json(&["dataset", "list"]);
    let sha = listed[0]["sha256"].as_str().unwrap().to_string();
    assert_eq!((listed[0]["name"].as_str(), listed[0]["bytes"].as_u64()), (Some("wine"), Some(size)));
    assert_eq!(listed[0]["files"][0]["path"], "wine.csv");
    // The same bytes again: the same version, not a second one.
    let again = fleet.json(&["dataset", "push", "wine", wine.to_str().unwrap()]);
    assert_eq!((again["sha256"].as_str(), again["versions"].as_u64()), (Some(sha.as_str()), Some(1)));

    let at = format!("[gantry] data set wine@{}", &sha[..12]);
    let (first, logs) = train_on(&fleet, "dataset://wine/wine.csv");
    assert!(logs.contains(&format!("{at}: fetched {size} bytes into this node's cache")), "{logs}");
    let reference = accuracy(&logs);
    assert!(reference >= 0.9, "wine from the pushed table: test accuracy {reference}\n{logs}");
    // The coordinator pinned the version the job trains on.
    let job = fleet.json(&["job", &first]);
    assert_eq!(job["datasets"][0].as_str(), Some(format!("dataset://wine@{sha}/wine.csv").as_str()), "{job}");

    // A command job names it in `data:`: its variable is the path of the node's copy.
    let wc = "name: wc\nmax_restarts: 0\nresources: {cpus: 0.5}\ndata: {WINE: 'dataset://wine/wine.csv'}\n\
              command: ['sh', '-c', 'wc -c < \"$WINE\"']\n";
    let id = fleet.submit(wc);
    let state = fleet.wait_state(&id, &["succeeded", "failed"], Duration::from_secs(60));
    let logs = fleet.ok(&["logs", &id]);
    assert_eq!(state, "succeeded", "{logs}");
    assert!(logs.contains(&format!("{at}: in this node's cache, verified")), "{logs}");
    assert!(logs.lines().any(|l| l.trim() == size.to_string()), "{logs}");
    assert_eq!(
        fleet.json(&["job", &id])["datasets"][0].as_str(),
        Some(format!("dataset://wine@{sha}/wine.csv").as_str())
    );

    // A second job (naming the whole data set: its one file) reads the node's copy.
    let (_, logs) = train_on(&fleet, "dataset://wine");
    assert!(logs.contains(&format!("{at}: in this node's cache, verified")), "{logs}");
    assert_eq!(accuracy(&logs), reference, "the same bytes and seed train the same model");

    // The agent restarts: its cache is still there.
    let mut agent = fleet.agents.remove(0);
    agent.kill().unwrap();
    agent.wait().unwrap();
    fleet.start_agent("node-a");
    fleet.wait_for_nodes(1);
    let (_, logs) = train_on(&fleet, "dataset://wine/wine.csv");
    assert!(logs.contains(&format!("{at}: in this node's cache, verified")), "{logs}");

    // One byte of the cached file changes: detected, fetched again, and the job trains as before.
    let cached = fleet.work_dir("node-a").join("datasets").join(&sha).join("files").join("wine.csv");
    let text = std::fs::read_to_string(&cached).unwrap();
    std::fs::write(&cached, text.replacen("14.23", "14.24", 1)).unwrap();
    let (_, logs) = train_on(&fleet, "dataset://wine/wine.csv");
    let refetched = format!("{at}: the cached copy is corrupt (`wine.csv` does not match its sha256): fetched {size}");
    assert!(logs.contains(&refetched), "{logs}");
    assert_eq!(accuracy(&logs), reference);
    assert_eq!(std::fs::read(&cached).unwrap(), std::fs::read(&wine).unwrap());
}

#[test]
fn bad_references_and_other_users_data_sets_are_refused_at_submit() {
    let fleet = Fleet::start();
    // A folder: every regular file under it, by its relative path.
    let folder = fleet.dir.path().join("corpus");
    std::fs::create_dir_all(folder.join("more")).unwrap();
    std::fs::write(folder.join("a.txt"), "in the beginning").unwrap();
    std::fs::write(folder.join("more").join("b.txt"), "and the earth").unwrap();
    let alice = fleet.cli_as(Some(&fleet.token("alice", "user")));
    let pushed: serde_json::Value =
        serde_json::from_str(&alice.ok(&["dataset", "push", "corpus", folder.to_str().unwrap(), "-o", "json"]))
            .unwrap();
    let paths: Vec<&str> = pushed["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
    assert_eq!((paths, pushed["owner"].as_str()), (vec!["a.txt", "more/b.txt"], Some("alice")));

    let spec = |path: &str| format!("name: t\ntrain: {{model: transformer, dataset: {{text: '{path}'}}}}\n");
    let never = fleet.cli().try_submit(&spec("dataset://nope/a.txt")).unwrap_err();
    assert!(never.contains("train.dataset.text: no data set `nope` was pushed"), "{never}");
    let missing = fleet.cli().try_submit(&spec("dataset://corpus/c.txt")).unwrap_err();
    assert!(missing.contains("no file or folder `c.txt` in it (it holds a.txt, more/b.txt)"), "{missing}");
    let malformed = fleet.cli().try_submit(&spec("dataset://Corpus/a.txt")).unwrap_err();
    assert!(malformed.contains("data set name `Corpus`"), "{malformed}");

    // Another user may neither train on alice's data set nor push over it.
    let bob = fleet.cli_as(Some(&fleet.token("bob", "user")));
    let denied = bob.try_submit(&spec("dataset://corpus/a.txt")).unwrap_err();
    assert!(denied.contains("bob (user) may not train on alice's data set"), "{denied}");
    let out = bob.gantry(&["dataset", "push", "corpus", folder.join("a.txt").to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("may not push alice's data set"));
    assert!(alice.try_submit(&spec("dataset://corpus/more")).is_ok(), "a folder of it");
    let listed = fleet.json(&["dataset", "list"]);
    assert_eq!((&listed[0]["sha256"], &listed[0]["versions"]), (&pushed["sha256"], &serde_json::json!(1)));
}

/// A table a user put in the coordinator's bucket: read and pinned when the job is accepted,
/// fetched by the agent through the coordinator (it holds no credentials) into its cache, and
/// never trained on once its bytes differ from the pin.
#[cfg(feature = "s3")]
#[test]
fn an_s3_table_in_the_coordinators_bucket_is_pinned_at_submit_fetched_and_checked() {
    let s3 = s3_server::S3Server::start("lab");
    let wine = std::fs::read(repo_root().join("examples/wine/wine.csv")).unwrap();
    s3.put("data/wine.csv", &wine);
    let mut fleet = Fleet::with_object_store("s3://lab/gantry", s3.env());
    let (id, logs) = train_on(&fleet, "s3://lab/data/wine.csv");
    let pinned = fleet.json(&["job", &id])["datasets"][0].as_str().unwrap().to_string();
    let sha = pinned.strip_prefix("s3://lab/data/wine.csv@").unwrap_or_else(|| panic!("{pinned}"));
    let at = format!("[gantry] s3://lab/data/wine.csv@{}", &sha[..12]);
    assert!(logs.contains(&format!("{at}: fetched {} bytes into this node's cache", wine.len())), "{logs}");
    let reference = accuracy(&logs);
    assert!(reference >= 0.9, "wine from S3: test accuracy {reference}\n{logs}");
    // A command job reads it through `data:`, from the same copy.
    let wc = "name: wc\nmax_restarts: 0\nresources: {cpus: 0.5}\ndata: {WINE: 's3://lab/data/wine.csv'}\n\
              command: ['sh', '-c', 'wc -c < \"$WINE\"']\n";
    let wc = fleet.submit(wc);
    assert_eq!(fleet.wait_state(&wc, &["succeeded", "failed"], Duration::from_secs(60)), "succeeded");
    let logs = fleet.ok(&["logs", &wc]);
    assert!(logs.contains(&format!("{at}: in this node's cache, verified")), "{logs}");
    assert!(logs.lines().any(|l| l.trim() == wine.len().to_string()), "{logs}");

    // What no spec may read, or that is not there, is refused at submit, naming the field.
    let spec = |path: &str| format!("name: t\ntrain: {{model: mlp, dataset: {{table: '{path}', label: cultivar}}}}\n");
    let other = fleet.cli().try_submit(&spec("s3://other/data/wine.csv")).unwrap_err();
    assert!(other.contains("train.dataset.table: `s3://other/data/wine.csv`: s3:// paths are read from the coordinator's own bucket, `lab`, only"), "{other}");
    let own = fleet.cli().try_submit(&spec("s3://lab/gantry/jobs")).unwrap_err();
    assert!(own.contains("holds gantry's own checkpoints or data sets"), "{own}");
    let missing = fleet.cli().try_submit(&spec("s3://lab/data/nope.csv")).unwrap_err();
    assert!(missing.contains("no such object, nor objects under it"), "{missing}");

    // Someone changes the object. A new submit pins the new bytes; an agent that never held the
    // old ones cannot fetch them any more, and the job pinned to them fails saying why.
    let changed = String::from_utf8(wine.clone()).unwrap().replacen("14.23", "14.24", 1);
    s3.put("data/wine.csv", changed.as_bytes());
    fleet.start_agent("node-b");
    fleet.wait_for_nodes(2);
    fleet.ok(&["drain", "node-a"]);
    let stale = fleet.submit(&format!(
        "name: stale\nmax_restarts: 0\nresources: {{cpus: 1}}\ntrain: {{model: mlp, dataset: {{table: '{pinned}', label: cultivar}}}}\n"
    ));
    assert_eq!(fleet.wait_state(&stale, &["succeeded", "failed"], Duration::from_secs(60)), "failed");
    let job = fleet.json(&["job", &stale]);
    let message = job["message"].as_str().unwrap();
    assert!(
        message.contains(&at["[gantry] ".len()..])
            && message.contains("no longer hold the bytes the job was pinned to"),
        "{job:#}"
    );
    let (id, logs) = train_on(&fleet, "s3://lab/data/wine.csv");
    let repinned = fleet.json(&["job", &id])["datasets"][0].as_str().unwrap().to_string();
    assert_ne!(repinned, pinned, "the new bytes are a new version");
    assert!(logs.contains("into this node's cache"), "{logs}");
}

#[test]
fn a_data_set_is_deleted_by_version_or_whole_by_its_owner_but_not_while_a_job_reads_it() {
    let fleet = Fleet::start();
    let alice = fleet.cli_as(Some(&fleet.token("alice", "user")));
    let file = fleet.dir.path().join("a.txt");
    let push = |text: &str| {
        std::fs::write(&file, text).unwrap();
        alice.json(&["dataset", "push", "corpus", file.to_str().unwrap()])["sha256"].as_str().unwrap().to_string()
    };
    let (v1, v2) = (push("in the beginning"), push("and the earth"));
    let stored = |sha: &str| fleet.data_dir().join("datasets").join(sha).exists();
    assert!(stored(&v1) && stored(&v2));
    // Pinned to v2 and queued for good: it asks for a GPU this fleet does not have.
    let job = alice
        .submit("name: t\nresources: {gpus: 1}\ntrain: {model: transformer, dataset: {text: 'dataset://corpus'}}\n");
    let refused = |cli: &support::Cli, what: &str| {
        String::from_utf8_lossy(&cli.gantry(&["dataset", "delete", what]).stderr).into_owned()
    };
    let busy = refused(&alice, &format!("corpus@{}", &v2[..12]));
    assert!(busy.contains(&format!("data set corpus@{} is what job {job} (queued) reads", &v2[..12])), "{busy}");
    let bob = fleet.cli_as(Some(&fleet.token("bob", "user")));
    let denied = refused(&bob, "corpus");
    assert!(denied.contains("bob (user) may not delete alice's data set"), "{denied}");
    assert!(refused(&alice, "corpus@ffff").contains("no data set version corpus@ffff was pushed"));
    assert!(refused(&alice, "corpus@").contains("`corpus@` names no version: give NAME alone"));

    // The version no job needs goes, with its files; the other stays.
    let said = alice.ok(&["dataset", "delete", &format!("corpus@{}", &v1[..12])]);
    assert_eq!(said.trim(), format!("deleted corpus@{}: 1 file, 16 B", &v1[..12]));
    assert!(!stored(&v1) && stored(&v2));
    assert_eq!(fleet.json(&["dataset", "list"])[0]["versions"], 1);

    // Once the job ended, the whole data set.
    alice.ok(&["cancel", &job]);
    fleet.wait_state(&job, &["cancelled"], Duration::from_secs(20));
    let gone = alice.json(&["dataset", "delete", "corpus"]);
    assert_eq!(gone[0]["sha256"].as_str(), Some(v2.as_str()));
    assert!(!stored(&v2));
    assert_eq!(fleet.json(&["dataset", "list"]), serde_json::json!([]));
    assert!(refused(&alice, "corpus").contains("no data set `corpus` was pushed"));
    // The name is free again: bob's first push makes it his.
    let pushed = bob.json(&["dataset", "push", "corpus", file.to_str().unwrap()]);
    assert_eq!(pushed["owner"], "bob");
}
