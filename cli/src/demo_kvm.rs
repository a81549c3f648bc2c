//! `pagefold demo`'s choice of path: real guests under KVM (the mini VMM of
//! `pagefold_tools::mini_vmm`) where `/dev/kvm` is usable, in this process
//! or one process per VM under the pagefold service (`--processes`); the
//! software path ([`crate::demo`]) where it is not or when asked; it says
//! which, and why.

use std::{
    error::Error,
    path::PathBuf,
    process::{Command, Stdio},
};

use pagefold_tools::mini_vmm::{processes, vmm};

use crate::demo;

/// Why KVM cannot run the demo here, or `None` if it can.
fn kvm_unusable() -> Option<String> {
    pagefold::kvm::probe().err().map(|e| e.to_string())
}

/// The demo's arguments.
pub(crate) struct DemoArgs {
    pub(crate) vms: u32,
    pub(crate) mib: u64,
    pub(crate) no_kvm: bool,
    pub(crate) processes: bool,
    pub(crate) receive_migration: Option<u16>,
    /// Be this VM process, under the service at this socket.
    pub(crate) vm_process: Option<(usize, PathBuf)>,
}

pub(crate) fn run(args: &DemoArgs) -> Result<(), Box<dyn Error>> {
    let &DemoArgs {
        vms,
        mib,
        no_kvm,
        processes,
        receive_migration,
        ..
    } = args;
    if let Some(port) = receive_migration {
        return vmm::receive(port).map_err(|e| e as Box<dyn Error>);
    }
    let exe = std::env::current_exe()?;
    let cfg = vmm::Config {
        vms: usize::try_from(vms)?,
        data_mib: mib,
        balloon_mib: mib / 8,
        fold_secs: 2.0,
        fold_goal_sharing: 0,
        verbose: true,
    };
    let spawn_receiver = |port: u16| {
        Command::new(&exe)
            .args(["demo", "--receive-migration", &port.to_string()])
            .stdout(if args.vm_process.is_some() {
                Stdio::null()
            } else {
                Stdio::inherit()
            })
            .spawn()
    };
    if let Some((index, socket)) = &args.vm_process {
        return processes::vm_process(*index, socket, &cfg, &spawn_receiver)
            .map_err(|e| e as Box<dyn Error>);
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
    if processes {
        println!(
            "pagefold demo: KVM path, one process per VM: {vms} VM processes run a 64-bit guest program on /dev/kvm, their memory under the pagefold service in this process"
        );
        let report = processes::run(&cfg, &|index, socket| {
            Command::new(&exe)
                .args([
                    "demo",
                    "--mib",
                    &mib.to_string(),
                    "--vm-process",
                    &index.to_string(),
                    "--socket",
                ])
                .arg(socket)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
        })
        .map_err(|e| e as Box<dyn Error>)?;
        let failed = report.verified.iter().any(|&(v, f)| f > 0 || v == 0)
            || report.migration.is_none_or(|m| m.failed > 0);
        if failed {
            return Err("a guest's verification failed".into());
        }
        println!("pagefold demo: every guest's memory checked out in its own process, before and after the migration");
        return Ok(());
    }
    println!(
        "pagefold demo: KVM path: {vms} VMs run a 64-bit guest program on /dev/kvm (--no-kvm for the software path; --processes for one process per VM)"
    );
    let report = vmm::run(&cfg, &spawn_receiver).map_err(|e| e as Box<dyn Error>)?;
    let failed = report.verified.iter().any(|&(_, f)| f > 0)
        || report.migration.is_none_or(|m| m.failed > 0);
    if failed {
        return Err("a guest's verification failed".into());
    }
    println!("pagefold demo: every guest's memory checked out, before and after the migration");
    Ok(())
}
