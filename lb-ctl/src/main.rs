//! `lb-ctl`: see the library for the parts; this file only maps the outcome to output and an
//! exit code.
use std::{
    io::{self, Write},
    process::ExitCode,
};

use lb_ctl::{
    Error,
    cli::Cli,
    exit,
    usage::{self, Parsed},
};

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().collect();
    let cli = match usage::parse::<Cli>(&args) {
        Parsed::Ok(cli) => cli,
        // --help and --version: clap's text on stdout, exit 0.
        Parsed::Print(e) => {
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(exit::FAILURE));
        }
        // Every usage error: one line on stderr, exit 2.
        Parsed::Usage(line) => {
            eprintln!("lb-ctl: error: {line}");
            return ExitCode::from(exit::INVALID_ARGUMENT);
        }
    };
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
