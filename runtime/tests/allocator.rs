//! The system allocator keeps freed storage for the next step (`pool::tune_system_allocator`):
//! a fresh process that allocates, fills and frees ~36 MiB of heap blocks five times takes
//! (almost) no page faults after the first round, and with `TRACEGRAD_MALLOC=system` (glibc's
//! defaults) faults on every page every round. Each case runs in a child process, so no other
//! test has moved glibc's thresholds first.

#![cfg(all(target_os = "linux", target_env = "gnu"))]

use std::process::Command;

use tracegrad_runtime::{pool, Buffer};

const CHILD: &str = "TRACEGRAD_ALLOCATOR_TEST_CHILD";
/// Three blocks of 12 MiB: heap blocks once tuned, and three times glibc's default trim
/// threshold when freed together.
const BLOCK: usize = 12 << 20;
const ROUNDS: i64 = 5;

fn minor_faults() -> i64 {
    // SAFETY: getrusage writes one rusage struct through the pointer, which is valid for it.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) }, 0);
    u.ru_minflt
}

fn round() {
    let blocks: Vec<Vec<u8>> = (0..3)
        .map(|i| {
            let mut v = Vec::with_capacity(BLOCK);
            v.resize(BLOCK, i as u8 + 1);
            v
        })
        .collect();
    assert!(blocks.iter().all(|b| b.len() == BLOCK));
}

/// The child's work: tune (through a first buffer), warm up, then count the faults of later
/// rounds and print them per round.
#[test]
fn child_faults_per_round() {
    if std::env::var(CHILD).is_err() {
        eprintln!("run by freed_heap_memory_is_kept_between_steps in a child process; nothing to do here");
        return;
    }
    drop(Buffer::from_vec(vec![0u8; 16], &[16]));
    round();
    let before = minor_faults();
    for _ in 0..ROUNDS {
        round();
    }
    println!("FAULTS_PER_ROUND {} TUNED {}", (minor_faults() - before) / ROUNDS, pool::system_allocator_tuned());
}

fn child(system: bool) -> (i64, bool) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child_faults_per_round", "--nocapture", "--test-threads=1"]).env(CHILD, "1");
    if system {
        cmd.env("TRACEGRAD_MALLOC", "system");
    } else {
        cmd.env_remove("TRACEGRAD_MALLOC");
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    // libtest prints the test's name first, on the same line.
    let at = text.find("FAULTS_PER_ROUND").unwrap_or_else(|| panic!("{text}"));
    let w: Vec<&str> = text[at..].split_whitespace().collect();
    (w[1].parse().unwrap(), w[3] == "true")
}

#[test]
fn freed_heap_memory_is_kept_between_steps() {
    let pages = (3 * BLOCK / 4096) as i64;
    let (tuned, is_tuned) = child(false);
    assert!(is_tuned, "the first buffer tunes glibc");
    assert!(tuned < pages / 20, "tuned: {tuned} page faults a round, {pages} pages allocated");
    let (system, is_tuned) = child(true);
    assert!(!is_tuned, "TRACEGRAD_MALLOC=system leaves glibc alone");
    assert!(system > pages / 2, "glibc's defaults: {system} page faults a round, {pages} pages allocated");
}
