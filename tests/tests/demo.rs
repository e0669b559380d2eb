//! `governor demo`: the one-command demonstration builds a campaign, delivers it to the built-in
//! sink through real worker processes, and exits 0 with every message delivered.

use std::process::Command;
use std::time::Duration;

use integration::*;

#[test]
fn demo_delivers_every_message() {
    let tmp = TestDir::new("demo");
    let b = bins();
    let mut cmd = Command::new(&b.governor);
    cmd.args([
        "demo",
        "--messages",
        "2000",
        "--rate",
        "1000",
        "--json",
        "--dir",
    ])
    .arg(tmp.join("demo"))
    .stdin(std::process::Stdio::null())
    .stdout(std::fs::File::create(tmp.join("stdout")).unwrap())
    .stderr(std::fs::File::create(tmp.join("stderr")).unwrap());
    let mut p = Proc::spawn("governor demo", &mut cmd);
    let status = p.wait_timeout(Duration::from_secs(120));
    let out = Outcome {
        code: status.and_then(|s| s.code()),
        stdout: std::fs::read_to_string(tmp.join("stdout")).unwrap_or_default(),
        stderr: std::fs::read_to_string(tmp.join("stderr")).unwrap_or_default(),
    };
    assert!(
        status.is_some(),
        "governor demo still running after 120 s\n{}",
        tail(&out.stderr, 4000)
    );
    out.expect_code(0);
    let sum = out.summary();
    assert_eq!(sum["status"], "complete", "summary {sum}");
    assert_eq!(sum["delivered"], 2000, "summary {sum}");
    assert_eq!(sum["total"], 2000, "summary {sum}");
    assert_eq!(sum["pending"], 0, "summary {sum}");
}
