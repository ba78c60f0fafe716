//! `kms-emulator`: the local DEW/KMS and IAM emulator as a command; runs until Ctrl-C or SIGTERM.
use std::process::ExitCode;

use clap::Parser;
use kms_emulator::{Emulator, EmulatorArgs, startup_banner};

fn main() -> ExitCode {
    run(EmulatorArgs::parse())
}

fn run(args: EmulatorArgs) -> ExitCode {
    let config = match args.into_config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let emulator = match Emulator::start(config).await {
            Ok(emulator) => emulator,
            Err(error) => {
                eprintln!("error: cannot start the emulator: {error}");
                return ExitCode::FAILURE;
            }
        };
        println!("{}", startup_banner(&emulator));
        wait_for_stop_signal().await;
        emulator.shutdown().await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_stop_signal() {
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(terminate) => terminate,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
