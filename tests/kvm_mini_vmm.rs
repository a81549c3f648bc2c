//! The mini VMM (`examples/mini_vmm`) as a test: three KVM VMs whose guests
//! fill, balloon and keep writing their memory while the dedup host folds
//! them; the walker on each vCPU's CR3; VM 0 live-migrated over TCP into a
//! fresh VM in another process (this test binary again, running the
//! ignored `receiver_process` entry point), where the guest runs on and
//! verifies its whole memory against its running checksum. Skips, saying
//! so, where `/dev/kvm` is absent or unusable.
#![cfg(feature = "kvm")]
#![cfg(target_arch = "x86_64")]
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use pagefold_tools::mini_vmm::vmm;

use std::process::Command;

const PORT_VAR: &str = "PAGEFOLD_MINI_VMM_RECEIVE_PORT";

fn kvm_usable(test: &str) -> bool {
    match pagefold::kvm::probe() {
        Ok(()) => true,
        Err(e) => {
            println!("SKIP {test}: KVM is not usable here: {e}");
            false
        }
    }
}

/// The receiving process's entry point, run by `mini_vmm_end_to_end`
/// through this binary with `--ignored --exact receiver_process`.
#[test]
#[ignore = "entry point of the receiving process, started by mini_vmm_end_to_end"]
fn receiver_process() {
    let port: u16 = std::env::var(PORT_VAR)
        .expect("started without the port")
        .parse()
        .unwrap();
    vmm::receive(port).unwrap();
}

#[test]
fn mini_vmm_end_to_end() {
    if !kvm_usable("mini_vmm_end_to_end") {
        return;
    }
    let mut cfg = vmm::Config {
        vms: 3,
        data_mib: 16,
        balloon_mib: 4,
        fold_secs: 1.5,
        fold_goal_sharing: 0,
        verbose: true,
    };
    // Folding: half of each VM's data is alike across VMs; the moving
    // window rewrites part of it all the time. The run folds until half of
    // that shares (or a minute passes), so the check below does not depend
    // on how much time the scanner got on a loaded machine.
    let prog = vmm::program(&cfg);
    let alike = prog.data_pages / 2 * (cfg.vms as u64 - 1);
    cfg.fold_goal_sharing = alike / 2;
    let exe = std::env::current_exe().unwrap();
    let report = vmm::run(&cfg, &|port| {
        Command::new(&exe)
            .args(["--ignored", "--exact", "receiver_process", "--nocapture"])
            .env(PORT_VAR, port.to_string())
            .spawn()
    })
    .unwrap();
    println!("mini_vmm_end_to_end: {report:#?}");

    // Every guest verified its whole memory (after the balloon, while
    // folded, and at the end), and none failed.
    for (i, &(verified, failed)) in report.verified.iter().enumerate() {
        assert_eq!(failed, 0, "VM {i}: a verification failed");
        assert!(verified >= 2, "VM {i} verified only {verified} times");
    }
    // The migrated guest ran on in the other process and checked out.
    let m = report.migration.unwrap();
    assert_eq!(m.failed, 0, "the migrated guest's verification failed");
    assert!(m.verified >= 2 && m.rounds_after >= 200, "{m:?}");
    // The balloon released exactly what the guests gave up, for real.
    assert_eq!(report.ballooned_pages, prog.balloon_pages * cfg.vms as u64);
    assert!(
        report.store_after_balloon + report.ballooned_pages * 4096 / 2
            <= report.store_before_balloon,
        "the frame store did not shrink: {} -> {}",
        report.store_before_balloon,
        report.store_after_balloon
    );
    assert!(
        report.peak.pages_sharing >= alike / 2,
        "peak sharing {} pages, want at least {}",
        report.peak.pages_sharing,
        alike / 2
    );
    assert!(report.last.cow_breaks > 0, "no guest write broke COW");
    assert_eq!(report.walks_checked, 3 * cfg.vms as u64);
}
