//! `mtls-agent`: see `mtls_agent::cli`.
fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(mtls_agent::cli::main())
}
