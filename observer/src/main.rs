//! The `observer` binary: everything is in the `cli` module, a module per command.
mod cli;

fn main() {
    match cli::run() {
        Ok(()) => {}
        // A closed pipe (`observer flows | head`) is a normal end, as for any Unix filter.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) => {}
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
