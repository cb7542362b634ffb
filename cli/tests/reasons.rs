//! Why a job waits and why it is stopped read the same wherever people look: `gantry job`,
//! `gantry jobs`, the web page (in a real browser) and `/metrics`.

mod support;

use std::time::{Duration, Instant};

use support::Fleet;

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn each_kind_of_reason_reads_the_same_in_the_cli_the_web_page_and_metrics() {
    // A long grace period: the preempted job ignores SIGTERM, so it stays "stopping" meanwhile.
    let fleet = Fleet::with_grace("120s");
    let cpus = fleet.json(&["nodes"])[0]["cpus"].as_u64().unwrap();
    let stubborn = fleet.submit(&format!(
        "name: stubborn\npriority: 10\nresources: {{cpus: {cpus}}}\n\
         command: [\"sh\", \"-c\", \"trap '' TERM; echo started; sleep 600\"]\n"
    ));
    fleet.wait_state(&stubborn, &["running"], Duration::from_secs(30));
    wait_for("the job to start", || fleet.ok(&["logs", &stubborn]).contains("started"));
    // A higher-priority job takes its CPUs: one waits for its victim, the other is stopped.
    let urgent =
        fleet.submit(&format!("name: urgent\npriority: 90\nresources: {{cpus: {cpus}}}\ncommand: [\"true\"]\n"));
    // And one that can never fit.
    let huge = fleet.submit("name: huge\nresources: {cpus: 4096}\ncommand: [\"true\"]\n");
    wait_for("the preemption", || fleet.json(&["job", &stubborn])["stop_code"] == "preempted");
    // The pass after the one that preempted sees its victim stopping.
    wait_for("the victim seen stopping", || fleet.json(&["job", &urgent])["pending_code"] == "waiting_for_stopping");

    // (job, which reason, its code): words taken from `gantry job -o json`, then looked for
    // verbatim everywhere else.
    let cases = [
        (&stubborn, "stop", "preempted"),
        (&urgent, "pending", "waiting_for_stopping"),
        (&huge, "pending", "cannot_fit"),
    ];
    let mut words = Vec::new();
    for (id, kind, code) in cases {
        let job = fleet.json(&["job", id]);
        assert_eq!(job[format!("{kind}_code")], code, "{job}");
        words.push(job[format!("{kind}_reason")].as_str().unwrap().to_string());
    }
    assert_eq!(words[0], format!("preempted by job {urgent}"));
    assert_eq!(words[1], "waiting for stopping jobs to free their resources");
    assert!(words[2].starts_with("needs 4096 CPUs"), "{}", words[2]);

    let listed = fleet.ok(&["jobs"]);
    let listed_json = fleet.json(&["jobs"]);
    let (_, metrics) = support::http_get_as(&fleet.web(), "/metrics", &fleet.admin_token).unwrap();
    let url = fleet.web_url("/");
    let out = support::chromium(&["--dump-dom"], &url);
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    let dom = String::from_utf8_lossy(&out.stdout);
    for ((id, kind, code), words) in cases.iter().zip(&words) {
        let (label, shown) = match *kind {
            "stop" => ("stopping:  ", format!("stopping: {words}")),
            _ => ("pending:   ", words.clone()),
        };
        let described = fleet.ok(&["job", id]);
        assert!(described.contains(&format!("{label}{words}")), "gantry job {id}:\n{described}");
        let row = listed.lines().find(|l| l.starts_with(id.as_str())).unwrap();
        assert!(row.trim_end().ends_with(&shown), "gantry jobs, job {id}: {row}");
        let entry = listed_json.as_array().unwrap().iter().find(|j| j["id"] == **id).unwrap();
        assert_eq!(entry[format!("{kind}_reason")], *words);
        assert!(dom.contains(&html_escape(&shown)), "the web page lacks {shown:?}:\n{dom}");
        let family = if *kind == "stop" { "gantry_job_stop_reason" } else { "gantry_job_pending_reason" };
        let series = format!("{family}{{job=\"{id}\",code=\"{code}\",reason=\"{words}\"}} 1");
        assert!(metrics.contains(&series), "/metrics lacks {series}:\n{metrics}");
    }
    fleet.ok(&["cancel", &huge]);
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
