"""CLI subcommands: one module each, discovered by `medico_peft.cli`. Keep module-level imports light."""
