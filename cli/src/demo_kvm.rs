//! `pagefold demo`'s choice of path: real guests under KVM (the mini VMM of
//! `pagefold_tools::mini_vmm`) where `/dev/kvm` is usable, the software path
//! ([`crate::demo`]) where it is not or when asked; it says which, and why.

use std::{error::Error, process::Command};

use pagefold_tools::mini_vmm::vmm;

use crate::demo;

/// Why KVM cannot run the demo here, or `None` if it can.
fn kvm_unusable() -> Option<String> {
    pagefold::kvm::probe().err().map(|e| e.to_string())
}

pub(crate) fn run(
    vms: u32,
    mib: u64,
    no_kvm: bool,
    receive_migration: Option<u16>,
) -> Result<(), Box<dyn Error>> {
    if let Some(port) = receive_migration {
        return vmm::receive(port).map_err(|e| e as Box<dyn Error>);
    }
    let why_not = if no_kvm {
        Some("--no-kvm given".to_string())
    } else {
        kvm_unusable()
    };
    if let Some(why) = why_not {
        println!("pagefold demo: software path ({why}): library writes stand in for the guests");
        return demo::run(vms, mib);
    }
    if vms < 2 || mib < 8 || mib % 4 != 0 {
        return Err("the KVM demo needs at least 2 VMs of at least 8 MiB, a multiple of 4".into());
    }
    println!(
        "pagefold demo: KVM path: {vms} VMs run a 64-bit guest program on /dev/kvm (--no-kvm for the software path)"
    );
    let exe = std::env::current_exe()?;
    let cfg = vmm::Config {
        vms: usize::try_from(vms)?,
        data_mib: mib,
        balloon_mib: mib / 8,
        fold_secs: 2.0,
        fold_goal_sharing: 0,
        verbose: true,
    };
    let report = vmm::run(&cfg, &|port| {
        Command::new(&exe)
            .args(["demo", "--receive-migration", &port.to_string()])
            .spawn()
    })
    .map_err(|e| e as Box<dyn Error>)?;
    let failed = report.verified.iter().any(|&(_, f)| f > 0)
        || report.migration.map_or(true, |m| m.failed > 0);
    if failed {
        return Err("a guest's verification failed".into());
    }
    println!("pagefold demo: every guest's memory checked out, before and after the migration");
    Ok(())
}
