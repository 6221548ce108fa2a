//! The `kvplugin` command: see `kvplugin --help`.

fn main() -> std::process::ExitCode {
    mistralrs_kvplugin::cli::main()
}
