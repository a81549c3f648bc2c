//! The mini VMM with one process per VM under the pagefold service: three
//! KVM guests, each in a process of its own (this test binary again, run
//! with `PAGEFOLD_MINI_VM=INDEX`), fill and keep writing their memory
//! while the service folds it; each verifies its whole memory against its
//! running checksum; VM 0's process live-migrates its guest into another
//! process (`PAGEFOLD_MINI_VMM_RECEIVE_PORT`), where it verifies again.
//! Skips, saying so, where `/dev/kvm` is absent or unusable.
//!
//! `harness = false`: the VM processes speak to the host over stdout.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

#[cfg(all(feature = "kvm", target_arch = "x86_64"))]
fn main() {
    use std::process::{Command, Stdio};

    use pagefold_tools::mini_vmm::{processes, vmm};

    const VM_VAR: &str = "PAGEFOLD_MINI_VM";
    const SOCKET_VAR: &str = "PAGEFOLD_MINI_VM_SOCKET";
    const PORT_VAR: &str = "PAGEFOLD_MINI_VMM_RECEIVE_PORT";

    let cfg = vmm::Config {
        vms: 3,
        data_mib: 16,
        balloon_mib: 0,
        fold_secs: 1.5,
        fold_goal_sharing: 0,
        verbose: true,
    };
    let exe = std::env::current_exe().unwrap();
    if let Ok(port) = std::env::var(PORT_VAR) {
        vmm::receive(port.parse().unwrap()).unwrap();
        return;
    }
    let spawn_receiver = |port: u16| {
        Command::new(&exe)
            .env_remove(VM_VAR)
            .env(PORT_VAR, port.to_string())
            .stdout(Stdio::null())
            .spawn()
    };
    if let Ok(index) = std::env::var(VM_VAR) {
        let socket = std::env::var(SOCKET_VAR).unwrap();
        processes::vm_process(
            index.parse().unwrap(),
            std::path::Path::new(&socket),
            &cfg,
            &spawn_receiver,
        )
        .unwrap();
        return;
    }
    if let Err(e) = pagefold::kvm::probe() {
        println!("SKIP mini_vmm_processes: KVM is not usable here: {e}");
        return;
    }
    // Folds until half of the data alike across VMs is merged (or a
    // minute passes), so the check does not depend on how much time the
    // scanner got on a loaded machine.
    let prog = vmm::program(&cfg);
    let mut cfg = cfg;
    cfg.fold_goal_sharing = prog.data_pages / 2 * cfg.vms as u64 / 2;
    let report = processes::run(&cfg, &|index, socket| {
        Command::new(&exe)
            .env(VM_VAR, index.to_string())
            .env(SOCKET_VAR, socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
    })
    .unwrap();
    assert_eq!(report.verified.len(), cfg.vms);
    for (i, &(verified, failed)) in report.verified.iter().enumerate() {
        assert_eq!(failed, 0, "VM {i}'s guest found its memory changed");
        assert!(verified >= 1, "VM {i}'s guest never verified");
    }
    let m = report.migration.unwrap();
    assert_eq!(m.failed, 0, "the migrated guest found its memory changed");
    assert!(m.verified >= 2, "{m:?}");
    assert!(
        report.peak_pages_merged >= cfg.fold_goal_sharing,
        "the service merged {} pages, want {}",
        report.peak_pages_merged,
        cfg.fold_goal_sharing
    );
    assert!(
        report.guest_bytes_at_peak + report.shared_bytes_at_peak < report.guest_bytes_filled,
        "{report:?}"
    );
    println!("mini_vmm_processes: ok");
}

#[cfg(not(all(feature = "kvm", target_arch = "x86_64")))]
fn main() {
    println!("SKIP mini_vmm_processes: built without KVM support");
}
