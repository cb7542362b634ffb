//! One suite, both backends: the promises every state store keeps (`store/mod.rs`). The etcd
//! runs start a real etcd server per test (Debian's `etcd-server`, installed by `.ci/run`) and
//! need the `etcd` feature.

use std::sync::Arc;

use gantry_coordinator::Error;
use gantry_coordinator::auth::{IssuedCertificate, Role, TokenRecord};
use gantry_coordinator::records::{
    AgentRecord, CheckpointRecord, DatasetRecord, DatasetVersion, FileRecord, JobState, RankPlacement,
};
use gantry_coordinator::store::{EmbeddedStore, StateStore};

fn spec(name: &str) -> gantry_core::JobSpec {
    gantry_core::JobSpec::from_yaml(&format!("name: {name}\ncommand: [\"true\"]\n")).unwrap()
}

/// Opens the store on the same durable state each time (a restart).
trait Fixture {
    fn open(&self) -> Arc<dyn StateStore>;
}

struct Embedded(tempfile::TempDir);

impl Fixture for Embedded {
    fn open(&self) -> Arc<dyn StateStore> {
        Arc::new(EmbeddedStore::open(&self.0.path().join("state.redb")).unwrap())
    }
}

fn embedded() -> Embedded {
    Embedded(tempfile::tempdir().unwrap())
}

mod checks {
    use super::*;

    pub fn submit_assigns_increasing_ids_and_lists_in_order(f: &dyn Fixture) {
        let s = f.open();
        let ids: Vec<String> = (0..5).map(|i| s.submit(spec(&format!("j{i}")), "alice", i).unwrap().id).collect();
        assert_eq!(ids, ["1", "2", "3", "4", "5"]);
        let jobs = s.jobs().unwrap();
        assert_eq!(jobs.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), ids);
        let third = s.job("3").unwrap();
        assert_eq!((third.spec.name.as_str(), third.state, third.version), ("j2", JobState::Queued, 1));
    }

    pub fn an_unknown_job_is_not_found(f: &dyn Fixture) {
        let s = f.open();
        s.submit(spec("a"), "alice", 0).unwrap();
        assert!(matches!(s.job("99"), Err(Error::JobNotFound(_))));
        assert!(matches!(s.job("abc"), Err(Error::JobNotFound(_))));
        assert!(matches!(s.update("99", |_| true), Err(Error::JobNotFound(_))));
    }

    pub fn a_change_bumps_the_version_and_a_refused_one_commits_nothing(f: &dyn Fixture) {
        let s = f.open();
        let job = s.submit(spec("a"), "alice", 0).unwrap();
        let changed = s
            .update(&job.id, |j| {
                j.message = "hello".into();
                true
            })
            .unwrap()
            .unwrap();
        assert_eq!((changed.version, changed.message.as_str()), (2, "hello"));
        let refused = s.update(&job.id, |j| {
            j.message = "lost".into();
            false
        });
        assert!(refused.unwrap().is_none());
        let now = s.job(&job.id).unwrap();
        assert_eq!((now.version, now.message.as_str()), (2, "hello"));
    }

    pub fn a_stale_plan_does_not_start_an_attempt(f: &dyn Fixture) {
        let s = f.open();
        let job = s.submit(spec("a"), "alice", 0).unwrap();
        s.update(&job.id, |j| {
            j.message = "touched".into();
            true
        })
        .unwrap();
        let placement = vec![RankPlacement { rank: 0, node: "n".into(), gpu_uuids: vec![] }];
        assert!(s.start_attempt(&job.id, job.version, placement.clone(), 1).unwrap().is_none());
        let fresh = s.job(&job.id).unwrap();
        let started = s.start_attempt(&job.id, fresh.version, placement, 1).unwrap().unwrap();
        assert_eq!((started.state, started.attempt, started.attempts.len()), (JobState::Running, 1, 1));
        assert_eq!(s.job(&job.id).unwrap().attempts[0].placement[0].node, "n");
    }

    pub fn checkpoints_are_listed_per_job_in_step_order(f: &dyn Fixture) {
        let s = f.open();
        let (a, b) = (s.submit(spec("a"), "alice", 0).unwrap(), s.submit(spec("b"), "alice", 0).unwrap());
        for (job, step) in [(&a, 300), (&a, 20), (&b, 5), (&a, 100)] {
            let record = CheckpointRecord {
                job_id: job.id.clone(),
                attempt: 1,
                step,
                bytes: step * 10,
                sha256: format!("sha-{step}"),
                files: vec![],
                committed_at_ms: 0,
                location: (step == 100).then(|| "objects/jobs/a/checkpoints/step-100/a1".to_string()),
            };
            s.put_checkpoint(&record).unwrap();
        }
        let steps: Vec<u64> = s.checkpoints(&a.id).unwrap().iter().map(|c| c.step).collect();
        assert_eq!(steps, [20, 100, 300]);
        let locations: Vec<Option<String>> = s.checkpoints(&a.id).unwrap().into_iter().map(|c| c.location).collect();
        assert_eq!(locations, [None, Some("objects/jobs/a/checkpoints/step-100/a1".into()), None]);
        assert_eq!(s.checkpoints(&b.id).unwrap().len(), 1);
    }

    pub fn agents_register_drain_and_are_removed(f: &dyn Fixture) {
        let s = f.open();
        let agent = |name: &str| AgentRecord {
            name: name.into(),
            inventory: vec![1, 2, 3],
            drained: false,
            registered_at_ms: 5,
        };
        s.put_agent(&agent("gpu-1")).unwrap();
        s.put_agent(&agent("gpu-2")).unwrap();
        assert!(s.set_drained("gpu-2", true).unwrap());
        assert!(!s.set_drained("nobody", true).unwrap());
        let mut agents = s.agents().unwrap();
        agents.sort_by(|a, b| a.name.cmp(&b.name));
        let seen: Vec<(&str, bool)> = agents.iter().map(|a| (a.name.as_str(), a.drained)).collect();
        assert_eq!(seen, [("gpu-1", false), ("gpu-2", true)]);
        assert_eq!(agents[0].inventory, [1, 2, 3]);
        assert!(s.delete_agent("gpu-1").unwrap());
        assert!(!s.delete_agent("gpu-1").unwrap(), "a second delete finds nothing");
        let left: Vec<String> = s.agents().unwrap().into_iter().map(|a| a.name).collect();
        assert_eq!(left, ["gpu-2"]);
    }

    pub fn tokens_are_kept_replaced_by_name_deleted_and_survive_a_restart(f: &dyn Fixture) {
        let token = |name: &str, role: Role, hash: &str| TokenRecord {
            name: name.into(),
            role,
            hash: hash.into(),
            created_at_ms: 1,
            expires_at_ms: Some(99),
            certificates: Vec::new(),
        };
        // An agent token keeps the certificates agents joined with.
        let mut joined = token("alice", Role::Agent, "h3");
        joined.certificates.push(IssuedCertificate { fingerprint: "ab12".into(), node: "n1".into(), expires_at_ms: 5 });
        {
            let s = f.open();
            s.put_token(&token("alice", Role::User, "h1")).unwrap();
            s.put_token(&token("ci", Role::Viewer, "h2")).unwrap();
            s.put_token(&joined).unwrap();
            assert!(s.delete_token("ci").unwrap());
            assert!(!s.delete_token("ci").unwrap(), "a second delete finds nothing");
        }
        let s = f.open();
        assert_eq!(s.tokens().unwrap(), [joined]);
    }

    pub fn datasets_keep_every_version_are_replaced_by_name_and_survive_a_restart(f: &dyn Fixture) {
        let record = |name: &str, sha: &str, at: i64| DatasetRecord {
            name: name.into(),
            owner: "alice".into(),
            version: DatasetVersion {
                sha256: sha.into(),
                bytes: 3,
                files: vec![FileRecord { path: "a.csv".into(), size: 3, sha256: "f".into() }],
                pushed_at_ms: at,
                location: None,
            },
        };
        {
            let s = f.open();
            assert_eq!(s.dataset_versions("wine").unwrap(), []);
            s.put_dataset(&record("wine", "v1", 1)).unwrap();
            s.put_dataset(&record("wine", "v2", 2)).unwrap();
            s.put_dataset(&record("iris", "v9", 3)).unwrap();
            // v1 pushed again: the same version, now the newest.
            s.put_dataset(&record("wine", "v1", 4)).unwrap();
        }
        let s = f.open();
        assert_eq!(s.dataset_versions("wine").unwrap(), [record("wine", "v2", 2), record("wine", "v1", 4)]);
        let mut names: Vec<String> = s.datasets().unwrap().into_iter().map(|d| d.name).collect();
        names.sort();
        assert_eq!(names, ["iris", "wine", "wine"]);
        // One version deleted: the other stays, a second delete finds none, and it stays gone.
        assert!(s.delete_dataset("wine", "v2").unwrap());
        assert!(!s.delete_dataset("wine", "v2").unwrap());
        assert!(!s.delete_dataset("nope", "v1").unwrap());
        drop(s);
        let s = f.open();
        assert_eq!(s.dataset_versions("wine").unwrap(), [record("wine", "v1", 4)]);
        assert_eq!(s.dataset_versions("iris").unwrap().len(), 1);
    }

    pub fn a_data_set_name_has_one_owner_until_it_is_released(f: &dyn Fixture) {
        {
            let s = f.open();
            assert_eq!(s.claim_dataset("wine", "alice").unwrap(), "alice");
            assert_eq!(s.claim_dataset("wine", "bob").unwrap(), "alice", "the first claim holds");
            assert_eq!(s.claim_dataset("iris", "bob").unwrap(), "bob");
        }
        let s = f.open();
        assert_eq!(s.claim_dataset("wine", "bob").unwrap(), "alice", "across a restart");
        s.release_dataset("wine").unwrap();
        s.release_dataset("never-claimed").unwrap();
        assert_eq!(s.claim_dataset("wine", "bob").unwrap(), "bob");
        assert_eq!(s.claim_dataset("iris", "alice").unwrap(), "bob");
    }

    pub fn everything_survives_a_restart_and_ids_continue(f: &dyn Fixture) {
        {
            let s = f.open();
            let job = s.submit(spec("a"), "alice", 7).unwrap();
            s.submit(spec("b"), "alice", 8).unwrap();
            s.update(&job.id, |j| {
                j.state = JobState::Succeeded;
                true
            })
            .unwrap();
            s.put_agent(&AgentRecord { name: "n".into(), inventory: vec![], drained: true, registered_at_ms: 5 })
                .unwrap();
        }
        let s = f.open();
        let jobs = s.jobs().unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!((jobs[0].state, jobs[0].version, jobs[0].submitted_at_ms), (JobState::Succeeded, 2, 7));
        assert!(s.agents().unwrap()[0].drained);
        assert_eq!(s.submit(spec("c"), "alice", 9).unwrap().id, "3");
    }

    pub fn concurrent_submits_get_distinct_ids_and_all_are_kept(f: &dyn Fixture) {
        let s = f.open();
        let ids: Vec<String> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|t| {
                    let s = s.clone();
                    scope.spawn(move || {
                        (0..25)
                            .map(|i| s.submit(spec(&format!("t{t}-{i}")), "alice", 0).unwrap().id)
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let distinct: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), 200);
        drop(s);
        assert_eq!(f.open().jobs().unwrap().len(), 200);
    }

    pub fn concurrent_changes_to_one_job_are_all_applied(f: &dyn Fixture) {
        let s = f.open();
        let job = s.submit(spec("a"), "alice", 0).unwrap();
        std::thread::scope(|scope| {
            for _ in 0..4 {
                let (s, id) = (s.clone(), job.id.clone());
                scope.spawn(move || {
                    for _ in 0..10 {
                        s.update(&id, |j| {
                            j.preemptions += 1;
                            true
                        })
                        .unwrap();
                    }
                });
            }
        });
        let after = s.job(&job.id).unwrap();
        assert_eq!((after.preemptions, after.version), (40, 41));
    }
}

macro_rules! conformance {
    ($backend:ident, $fixture:expr) => {
        mod $backend {
            use super::*;
            #[test]
            fn submit_assigns_increasing_ids_and_lists_in_order() {
                checks::submit_assigns_increasing_ids_and_lists_in_order(&$fixture);
            }
            #[test]
            fn an_unknown_job_is_not_found() {
                checks::an_unknown_job_is_not_found(&$fixture);
            }
            #[test]
            fn a_change_bumps_the_version_and_a_refused_one_commits_nothing() {
                checks::a_change_bumps_the_version_and_a_refused_one_commits_nothing(&$fixture);
            }
            #[test]
            fn a_stale_plan_does_not_start_an_attempt() {
                checks::a_stale_plan_does_not_start_an_attempt(&$fixture);
            }
            #[test]
            fn checkpoints_are_listed_per_job_in_step_order() {
                checks::checkpoints_are_listed_per_job_in_step_order(&$fixture);
            }
            #[test]
            fn agents_register_drain_and_are_removed() {
                checks::agents_register_drain_and_are_removed(&$fixture);
            }
            #[test]
            fn tokens_are_kept_replaced_by_name_deleted_and_survive_a_restart() {
                checks::tokens_are_kept_replaced_by_name_deleted_and_survive_a_restart(&$fixture);
            }
            #[test]
            fn datasets_keep_every_version_are_replaced_by_name_and_survive_a_restart() {
                checks::datasets_keep_every_version_are_replaced_by_name_and_survive_a_restart(&$fixture);
            }
            #[test]
            fn a_data_set_name_has_one_owner_until_it_is_released() {
                checks::a_data_set_name_has_one_owner_until_it_is_released(&$fixture);
            }
            #[test]
            fn everything_survives_a_restart_and_ids_continue() {
                checks::everything_survives_a_restart_and_ids_continue(&$fixture);
            }
            #[test]
            fn concurrent_submits_get_distinct_ids_and_all_are_kept() {
                checks::concurrent_submits_get_distinct_ids_and_all_are_kept(&$fixture);
            }
            #[test]
            fn concurrent_changes_to_one_job_are_all_applied() {
                checks::concurrent_changes_to_one_job_are_all_applied(&$fixture);
            }
        }
    };
}

conformance!(embedded_store, embedded());

#[cfg(feature = "etcd")]
#[path = "support/etcd_server.rs"]
mod etcd_server;

#[cfg(feature = "etcd")]
mod etcd {
    use std::time::{Duration, Instant};

    use gantry_coordinator::store::{EtcdOptions, EtcdStore};

    use super::etcd_server::EtcdServer;
    use super::*;

    fn options(server: &EtcdServer, name: &str) -> EtcdOptions {
        EtcdOptions {
            endpoints: vec![server.url.clone()],
            prefix: "/test".into(),
            name: name.into(),
            lease_ttl: Duration::from_secs(2),
        }
    }

    pub struct Etcd(EtcdServer);

    impl Fixture for Etcd {
        fn open(&self) -> Arc<dyn StateStore> {
            Arc::new(EtcdStore::connect(options(&self.0, "conformance")).unwrap())
        }
    }

    pub fn etcd() -> Etcd {
        Etcd(EtcdServer::start())
    }

    conformance!(etcd_store, etcd());

    #[test]
    fn a_leader_that_lost_its_lease_cannot_commit_anything() {
        let server = EtcdServer::start();
        let old = EtcdStore::connect(options(&server, "old")).unwrap();
        old.submit(spec("before"), "alice", 0).unwrap();
        // As if SIGSTOPped: no renewals; the store itself still believes it leads.
        old.pause_renewals();
        let started = Instant::now();
        let new = EtcdStore::connect(options(&server, "new")).unwrap();
        println!("the successor led {:?} after the old leader's renewals stopped", started.elapsed());
        assert!(new.token() > old.token());
        let refused = old.submit(spec("from the old leader"), "alice", 0);
        assert!(matches!(refused, Err(Error::Fenced(_))), "{refused:?}");
        let update = (&old as &dyn StateStore).update("1", |j| {
            j.message = "stale".into();
            true
        });
        assert!(matches!(update, Err(Error::Fenced(_))), "{update:?}");
        new.submit(spec("after"), "alice", 0).unwrap();
        drop(new);
        let again = EtcdStore::connect(options(&server, "check")).unwrap();
        let names: Vec<String> =
            again.jobs().unwrap().into_iter().map(|j| format!("{}:{}", j.spec.name, j.message)).collect();
        assert_eq!(names, ["before:", "after:"], "nothing of the old leader's got in");
    }

    #[test]
    fn a_second_coordinator_waits_and_takes_over_when_the_leader_steps_down() {
        let server = EtcdServer::start();
        let first = EtcdStore::connect(options(&server, "first")).unwrap();
        first.submit(spec("a"), "alice", 0).unwrap();
        let options = options(&server, "second");
        let waiting = std::thread::spawn(move || EtcdStore::connect(options).unwrap());
        std::thread::sleep(Duration::from_millis(800));
        assert!(!waiting.is_finished(), "the second must wait while the first leads");
        let stepped_down = Instant::now();
        drop(first);
        let second = waiting.join().unwrap();
        println!("took over {:?} after the leader stepped down", stepped_down.elapsed());
        assert_eq!(second.jobs().unwrap().len(), 1);
        assert_eq!(second.submit(spec("b"), "alice", 0).unwrap().id, "2");
    }
}
