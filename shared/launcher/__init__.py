"""The `streamoe` command: its subcommands, the flag parsing every service shares, `streamoe up`
and the embedded Redis."""
