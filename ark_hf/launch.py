"""`python -m ark_hf.launch`: `accelerate launch`, after checking its config file.

Takes exactly `accelerate launch`'s arguments. Before anything starts, it reads the config file and the values
given on the command line, and refuses a config whose machines cannot meet, naming the file (or the flag) and the
key (`ark_hf.utils.preflight.check_accelerate_config_file`). The cases: several machines without
`main_process_ip`; a `machine_rank` outside `num_machines`; a `num_processes` that is not a multiple of
`num_machines`. Plain `accelerate launch` hands such a config to torch's rendezvous, which waits for the missing
machine without end. Then it runs `accelerate launch` with the same arguments, in this process.

Two machines (accelerate_configs/multi_node_ddp.yaml, main_process_ip set to the first machine's address):

    # on the machine at main_process_ip
    python -m ark_hf.launch --config_file accelerate_configs/multi_node_ddp.yaml --machine_rank 0 \\
        recipes/bge_m3.py --config recipes/configs/bge_m3_unified_self_distill.yaml ...
    # on the other machine: the same command with --machine_rank 1
"""

from __future__ import annotations

import os
import sys

from ark_hf.utils.cli import ConfigError
from ark_hf.utils.preflight import check_accelerate_config_file

__all__ = ["main"]

# the command-line flags of `accelerate launch` that override what the multi-machine check reads from the file
OVERRIDES = ("num_machines", "machine_rank", "num_processes", "main_process_ip", "main_process_port")


def main(argv: list[str] | None = None) -> None:
    from accelerate.commands.config import default_config_file
    from accelerate.commands.launch import launch_command, launch_command_parser

    args = launch_command_parser().parse_args(sys.argv[1:] if argv is None else argv)
    config_file = args.config_file or (default_config_file if os.path.isfile(default_config_file) else None)
    if config_file is not None:
        try:
            check_accelerate_config_file(config_file, {key: getattr(args, key, None) for key in OVERRIDES})
        except ConfigError as error:
            raise SystemExit(f"ark_hf.launch: {error}") from None
    launch_command(args)


if __name__ == "__main__":
    main()
