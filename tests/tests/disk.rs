//! The spool's filesystem fills up mid-campaign (issue 5, "Disk" row).
//!
//! The spool lives on a size-limited tmpfs mounted for the test (root only; where mounting is not
//! permitted the test prints why and is skipped). Once deliveries are under way a filler file
//! takes every free byte: the governor must report the spool write failure, pause dispatch
//! instead of sending what it cannot record, keep running, and resume on its own when the filler
//! is deleted. At the end every job is delivered (each recipient reached the receiver), the run
//! exits 0 and `PRAGMA integrity_check` of the spool says `ok`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use integration::*;

/// A tmpfs mounted on `dir`; unmounted (lazily) on drop.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(dir: &Path, size: &str) -> Result<Mount, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("not root: cannot mount a size-limited filesystem".into());
        }
        fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs refused: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Mount(dir.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes zeros to `path` until the filesystem is full; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = fs::File::create(path).expect("create filler");
    let chunk = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k as u64,
        }
    }
    // Also the last few bytes.
    let small = [0u8; 512];
    while let Ok(k) = f.write(&small) {
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    let _ = f.sync_all();
    n
}

fn integrity(spool: &Path) -> String {
    let db = rusqlite::Connection::open(spool).expect("open spool");
    db.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0))
        .expect("integrity_check")
}

#[test]
fn spool_filesystem_full_pauses_dispatch_and_resumes_when_space_returns() {
    const N: usize = 4000;
    let tmp = TestDir::new("disk-full");
    let mnt = tmp.join("small");
    let _mount = match Mount::tmpfs(&mnt, "24m") {
        Ok(m) => m,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let peer = Peer::governor_sink(&tmp.join("received"), &[]);
    let camp = Campaign::new(&tmp.join("run"), peer.port)
        .rate(250.0)
        .workers(1, 2)
        .campaign("disk", numbered_recipients(N), SIMPLE_TEMPLATE);
    let cfg = camp.write();
    let spool = mnt.join("spool.db");
    camp.rewrite_config(&camp.toml().replacen(
        "spool = \"var/spool.db\"",
        &format!("spool = \"{}\"", spool.display()),
        1,
    ));
    let run = spawn_governor(&cfg, None, &[]);
    assert!(
        wait_until(Duration::from_secs(60), || peer.count() >= 300
            || !alive(run.pid())),
        "no progress\n{}",
        tail(&run.stderr_now(), 3000)
    );
    let filler = mnt.join("filler");
    let filled = fill(&filler);
    let at_fill = peer.count();
    assert!(
        at_fill < N,
        "campaign finished before the disk was filled; raise N"
    );

    // The failure is reported and dispatch pauses: the receiver stops growing (what was already
    // handed to workers may still arrive).
    let reported = wait_until(Duration::from_secs(30), || {
        run.stderr_now().contains("dispatch paused") || !alive(run.pid())
    });
    let stderr = run.stderr_now();
    assert!(
        reported && alive(run.pid()),
        "no 'dispatch paused' report within 30 s of filling the disk ({filled} bytes), or the governor died\n{}",
        tail(&stderr, 4000)
    );
    std::thread::sleep(Duration::from_millis(1500));
    let paused_a = peer.count();
    std::thread::sleep(Duration::from_secs(2));
    let paused_b = peer.count();
    assert!(
        paused_b - paused_a <= 2 * 4 * 2,
        "deliveries went on while the spool could not record them: {paused_a} -> {paused_b} in 2 s"
    );
    assert!(
        alive(run.pid()),
        "the governor exited while the disk was full"
    );

    // Space returns: it resumes on its own and finishes.
    let t = Instant::now();
    fs::remove_file(&filler).expect("remove filler");
    let out = run.wait(Duration::from_secs(180));
    eprintln!(
        "disk full: filled {filled} bytes at {at_fill} delivered; paused at {paused_b}; finished {:.1}s after space returned",
        t.elapsed().as_secs_f64()
    );
    out.expect_code(0);
    assert!(
        out.stderr.contains("spool writable again") || out.stderr.contains("dispatch resumes"),
        "no resume reported\n{}",
        tail(&out.stderr, 4000)
    );
    assert!(!out.stderr.contains("panicked"));
    let sum = out.summary();
    assert_eq!(sum["delivered"], N as u64, "summary {sum}");
    assert_eq!(integrity(&spool), "ok", "spool integrity");
    assert_eq!(spool_unfinished(&spool), 0);
    let mut got = std::collections::BTreeSet::new();
    for s in peer.messages() {
        got.extend(s.rcpt);
    }
    assert_eq!(got.len(), N, "recipients that reached the receiver");
}
