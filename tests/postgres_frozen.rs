//! The database stops answering without closing its connections (its
//! processes frozen, as a hung server or a black-holed network leaves
//! them): the relay answers 503 once a round has waited its limit, instead
//! of holding every webhook for as long, and acks again once the database
//! answers, without a restart. Its own test process, so that freezing the
//! throwaway cluster disturbs no other test.

mod common;
#[path = "../src/store/postgres/throwaway.rs"]
mod throwaway;

use std::time::{Duration, Instant};

use common::*;

/// The postmaster and its backends, stopped (`SIGSTOP`) until dropped.
struct Frozen(Vec<String>);

impl Frozen {
    fn freeze(postmaster: u32) -> Frozen {
        // Its children: the processes whose parent (the 2nd field after the
        // parenthesised name in /proc/PID/stat) it is.
        let parent = postmaster.to_string();
        let mut pids: Vec<String> = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
                after_name.split_whitespace().nth(1) == Some(parent.as_str())
            })
            .collect();
        pids.push(parent);
        for pid in &pids {
            let _ = std::process::Command::new("kill").args(["-STOP", pid]).status();
        }
        Frozen(pids)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for pid in self.0.iter().rev() {
            let _ = std::process::Command::new("kill").args(["-CONT", pid]).status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_database_is_503_after_the_round_limit_and_acks_resume_when_it_thaws() {
    let Some(cluster) = throwaway::cluster("a_frozen_database") else { return };
    let url = cluster.database();
    let target = FakeTarget::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = pg_search_config(dir.path(), &url, 4, &target, "");
    let (relay, addr) = spawn_relay(&config);
    for n in 0..5 {
        assert_eq!(post_butter(addr, butter_page(n)).await.status, 202);
    }

    let frozen = Frozen::freeze(cluster.server_pid());
    let asked = Instant::now();
    let replies = futures_util::future::join_all((10..13).map(|n| post_butter(addr, butter_page(n))));
    // Each within the limit from when it was sent, not one limit after another.
    let replies = tokio::time::timeout(Duration::from_secs(15), replies).await.expect("answered while frozen");
    let waited = asked.elapsed();
    for reply in &replies {
        assert_eq!(reply.status, 503, "{}", reply.body.escape_ascii());
    }
    // The round's limit is 10 s.
    assert!(waited >= Duration::from_secs(9), "503 before the limit: {waited:?}");
    drop(frozen);

    // Thawed: the same process acks again (a few rounds may still be waiting out the freeze).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reply = post_butter(addr, butter_page(100)).await;
        if reply.status == 202 {
            break;
        }
        assert!(Instant::now() < deadline, "never acked again: {}", reply.status);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(relay);
}
