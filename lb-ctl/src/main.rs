//! `lb-ctl`: see the library for the parts; this file only maps the outcome to output and an
//! exit code.
use std::{
    io::{self, Write},
    process::ExitCode,
};

use clap::Parser;
use lb_ctl::{Error, cli::Cli, exit};

fn main() -> ExitCode {
    // Usage errors exit 2 and --help/--version exit 0, as clap does.
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Protocol(format!("cannot start the async runtime: {e}")))
        .and_then(|rt| rt.block_on(lb_ctl::run(&cli)));
    match result {
        Ok(text) => match io::stdout().lock().write_all(text.as_bytes()) {
            // The reader went away (`lb-ctl service ls | head`): nothing left to tell it.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            Err(e) => fail(&Error::Output(e)),
            Ok(()) => ExitCode::from(exit::SUCCESS),
        },
        Err(e) => fail(&e),
    }
}

fn fail(e: &Error) -> ExitCode {
    eprintln!("lb-ctl: error: {e}");
    ExitCode::from(e.exit_code())
}
