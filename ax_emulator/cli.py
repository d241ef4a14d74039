"""`ax-emulator`: the virtual AX-M1 card's runner programs.

    ax-emulator --flag value ...   behaves as main_axcl_aarch64 (dialects A, B, b_reset, vl_internvl, vl_qwen)
    ax-emulator run <dir>          behaves as `axllm run <dir>` (dialect C)
    ax-emulator --help             every flag, fault and environment variable
"""
from __future__ import annotations

import sys

from ax_emulator import flags as flag_parser
from ax_emulator.faults import FAULT_HELP, FaultSpecError

PROGRAM = "ax-emulator"

ENVIRONMENT_HELP = {
    "AX_EMU_FAULTS": "fault SPEC, overrides --emu_faults key by key",
    "AX_EMU_FAULT_FILE": "JSON object of fault keys, overrides both; re-read at start and every turn",
    "AX_EMU_STATE_DIR": "where the 'card memory busy' state lives (default: the system temp dir)",
}


def help_text() -> str:
    def table(rows: dict[str, str], prefix: str = "") -> str:
        width = max(len(prefix + key) for key in rows) + 2
        return "".join(f"  {(prefix + key).ljust(width)}{text}\n" for key, text in rows.items())

    real_flags = {}
    for dialect, label in (("a", "A"), ("b", "B"), ("b_reset", "B"), ("vl_internvl", "VL"), ("vl_qwen", "VL qwen")):
        for build in ("axcl", "ax650"):
            for flag in flag_parser.flag_table(dialect, build):
                if not flag.name.startswith("emu_"):
                    real_flags.setdefault(flag.name, (flag, set()))[1].add((label, build))
    rows = {}
    for name, (flag, where) in real_flags.items():
        labels = sorted({label for label, _ in where})
        if "VL" in labels:
            labels = [label for label in labels if label != "VL qwen"]
        builds = sorted({build for _, build in where})
        scope = " and ".join(labels) if len(labels) > 1 else labels[0] + " only"
        if builds != ["ax650", "axcl"]:
            scope += f", {builds[0]} build"
        rows[name] = f"{flag.description} ({scope}{'; required' if flag.required else ''})"
    rows["devices"] = f'{real_flags["devices"][0].description.strip()} (axcl builds only; required in B and VL)'
    rows["tokenizer_type"] = f'{real_flags["tokenizer_type"][0].description} (A; B only in ax650 builds)'
    emulator_rows = {f.name: f"{f.description} (default {f.default!r})" for f in flag_parser.EMULATOR_FLAGS}
    return (
        __doc__.strip() + "\n\n"
        "Flags are --name value or --name=value; booleans take only 0 or 1. Unknown flags, bad values\n"
        "and missing required flags print the error and the usage to stderr and exit 1.\n\n"
        "Runner flags (as the real binaries):\n" + table(rows, "--") +
        "\nEmulator flags:\n" + table(emulator_rows, "--") +
        "\nFAULTS (SPEC = key=value,key=value):\n" + table(FAULT_HELP) +
        "\nEnvironment:\n" + table(ENVIRONMENT_HELP) +
        "\nInput: one prompt per line; empty lines are ignored; q quits (status 0); end of input does\n"
        "not quit; Ctrl-C (SIGINT) stops the current reply; SIGTERM ends the process.\n"
        "Vision dialects (vl_internvl, vl_qwen; docs/vlm-runners.md): after each prompt line the\n"
        "runner prints `image >> ` (`video >> ` with --video 1) and reads an image path; an empty line\n"
        "is a text-only turn, a missing or corrupt image logs `image prompt(PATH) not found`. The\n"
        "reply starts with `[image N: WxH FORMAT sha256:<12 hex>]` per image; always scripted.\n"
        "Dialect C (`run <dir>`) reads <dir>/config.json: tokenizer_path (relative to <dir>),\n"
        "system_prompt, emu_engine, emu_tokens_per_second, emu_reply_words, emu_think, emu_init_seconds;\n"
        "commands /q and /exit quit, /reset clears the KV cache.\n"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--help"] or argv[:1] == ["-?"]:
        sys.stdout.write(help_text())
        return 0
    if argv[:1] == ["run"]:
        from ax_emulator import axllm

        if len(argv) != 2:
            sys.stderr.write(f"usage: {PROGRAM} run <model_dir>\n")
            return 1
        return axllm.main(argv[1])
    try:
        values = flag_parser.parse(argv)
    except flag_parser.FlagError as error:
        dialect = flag_parser.scan(argv, "emu_dialect", "b")
        build = flag_parser.scan(argv, "emu_build", "axcl")
        sys.stderr.write(f"{error}\n" + flag_parser.usage(PROGRAM, dialect, build))
        return 1
    from ax_emulator import runner

    try:
        return runner.main(values)
    except FaultSpecError as error:
        sys.stderr.write(f"ax-emulator: {error}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
