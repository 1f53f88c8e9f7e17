"""``detc`` with the verbs issue 20 adds (``package``, ``compile --depfile``, ``--cmake-dir``),
for the build-system tests, as the CLI patch wires them. Once the CLI has them, every call goes
straight to it."""

from __future__ import annotations

import sys

from detc.compiler.cli.app import cli, main
from detc.compiler.cli.build import compile_cmd


def _cli_has_the_verbs() -> bool:
    return "package" in cli.commands and any(p.name == "depfile" for p in compile_cmd.params)


def _shim(argv: list[str]) -> int:
    if argv == ["--cmake-dir"]:
        from detc.targets.bundle import cmake_dir

        print(cmake_dir())
        return 0
    if argv[:1] == ["package"]:
        from detc.targets.bundle import package_artifact

        output = argv[argv.index("-o") + 1]
        package_artifact(argv[1], output)
        print(f"wrote {output}")
        return 0
    if argv[:1] == ["compile"] and "--depfile" in argv:
        at = argv.index("--depfile")
        depfile, argv = argv[at + 1], argv[:at] + argv[at + 2 :]
        from pathlib import Path

        from detc.compiler.cli.options import load_pipeline
        from detc.compiler.depfile import compile_dependencies, write_depfile

        params = compile_cmd.make_context("compile", argv[1:]).params
        try:
            main(argv)
        except SystemExit as done:
            if done.code:
                return int(done.code)
        pipeline = load_pipeline(params["pipeline"], params["config"], params["calib"])
        dependencies = compile_dependencies(
            params["model"], pipeline=pipeline, spec=params["spec"], config=params["config"]
        )
        write_depfile(Path(depfile), params["output"] / "manifest.json", dependencies)
        return 0
    main(argv)
    return 0


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if _cli_has_the_verbs():
        main(arguments)
    sys.exit(_shim(arguments))
