//! A full disk, for real: the store on a small tmpfs. Ingress answers 503
//! while nothing can be written, loses nothing it acknowledged, and accepts
//! again once space returns. Needs permission to mount (root in CI); where
//! mounting is refused the test says so and checks nothing.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use hookrelay::store::EventId;
use http::StatusCode;

/// A tmpfs of `size`, unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(at).ok()?;
        let ok = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(at).status();
        matches!(ok, Ok(s) if s.success()).then(|| SmallDisk(at.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazy: files the relay still holds (after a failed assertion) must not keep it mounted.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the disk with a ballast file; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("ballast");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    path
}

#[tokio::test]
async fn a_full_disk_answers_503_loses_nothing_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(&dir.path().join("disk"), "24m") else {
        println!("SKIPPED: cannot mount a tmpfs here (not root?); the Store-level 503 tests still run");
        return;
    };
    let text = config_text(dir.path(), "", "")
        .replace(&dir.path().join("data").display().to_string(), &disk.0.join("data").display().to_string());
    let settings = hookrelay::config::load(&write_config(dir.path(), &text)).unwrap();
    let relay = hookrelay::app::Relay::start(settings).await.unwrap();
    let addr = relay.ingress_addr;

    let mut acked: Vec<EventId> = Vec::new();
    for n in 0..20 {
        let r = post_butter(addr, butter_page(n)).await;
        assert_eq!(r.status, StatusCode::ACCEPTED);
        acked.push(r.json()["id"].as_str().unwrap().parse().unwrap());
    }
    let ballast = fill(&disk.0);
    // Until sled's log needs a new block, a write may still fit: post until refused.
    let mut refused = false;
    for n in 100..3_000 {
        let r = post_butter(addr, butter_page(n)).await;
        match r.status {
            StatusCode::ACCEPTED => acked.push(r.json()["id"].as_str().unwrap().parse().unwrap()),
            StatusCode::SERVICE_UNAVAILABLE => {
                refused = true;
                break;
            }
            other => panic!("unexpected {other}: {:?}", r.body),
        }
    }
    assert!(refused, "a full disk never answered 503");
    // sled cannot write again until reopened: the relay says it is not ready.
    assert!(!relay.store.healthy());
    let readyz = send(
        relay.admin_addr,
        http::Request::get("/readyz").header("host", "a").body(http_body_util::Full::new(bytes::Bytes::new())).unwrap(),
    )
    .await;
    assert_eq!(readyz.status, StatusCode::SERVICE_UNAVAILABLE);
    let stopped = tokio::time::timeout(WAIT, relay.stop(std::time::Duration::from_secs(5))).await;
    assert!(stopped.is_ok(), "stop hung on a failed store");

    // Space returns; a restart (what `serve` asks its supervisor for) accepts again.
    std::fs::remove_file(ballast).unwrap();
    let settings = hookrelay::config::load(&dir.path().join("routes.yaml")).unwrap();
    let relay = hookrelay::app::Relay::start(settings).await.unwrap_or_else(|e| panic!("restart: {e}"));
    assert_eq!(post_butter(relay.ingress_addr, butter_page(9_999_999)).await.status, StatusCode::ACCEPTED);
    for id in &acked {
        assert!(relay.store.event(*id).await.unwrap().is_some(), "acked {id} lost on a full disk");
    }
    relay.stop(std::time::Duration::from_secs(5)).await.unwrap();
}
