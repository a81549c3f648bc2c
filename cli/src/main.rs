//! The `pagefold` command line: a demo of the library on built-in guests,
//! and operator tools over raw guest RAM images.

mod demo;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// pagefold: guest memory virtualization for VMMs.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build a few VMs' guest memory on one frame store, write and read it,
    /// and print what it holds (the kernel's figures included).
    Demo {
        /// Number of VMs.
        #[arg(long, default_value_t = 3)]
        vms: u32,
        /// Guest RAM per VM, in MiB.
        #[arg(long, default_value_t = 64)]
        mib: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo { vms, mib } => demo::run(vms, mib),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pagefold: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::FAILURE
        }
    }
}
