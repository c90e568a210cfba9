"""The plugin's import gives fairseq's commands back their own logging, and touches a
logging set-up made by anyone else not at all."""

import os
import sys

from lm_builders import run_command

REPORT = ("import logging, warnings; root = logging.getLogger(); "
          "print(logging.getLevelName(root.level), len(root.handlers), "
          "root.handlers[0].formatter._fmt, root.handlers[0].stream.name, "
          "logging.getLogger('faiss.loader').getEffectiveLevel() >= logging.WARNING)")


def imported(before: str = "", loglevel: str = None):
    env = {key: value for key, value in os.environ.items() if key != "LOGLEVEL"}
    if loglevel:
        env["LOGLEVEL"] = loglevel
    result = run_command(sys.executable, "-c", before + "import fairseq_memtrm; " + REPORT, env=env)
    return result.stdout.strip().splitlines()[-1], result.stdout + result.stderr


def test_fairseqs_debug_root_logger_becomes_fairseq_clis_info_format():
    report, output = imported()
    assert report == "INFO 1 %(asctime)s | %(levelname)s | %(name)s | %(message)s <stdout> True"
    # faiss's loader searched for its library while the plugin imported it: none of that is shown
    assert "faiss.loader" not in output and "DEBUG:" not in output


def test_loglevel_is_honoured_as_fairseq_cli_honours_it():
    report, _ = imported(loglevel="warning")
    assert report.startswith("WARNING 1 %(asctime)s | ")


def test_a_logging_set_up_made_before_the_import_is_kept():
    report, _ = imported(before="import logging; logging.basicConfig(level=logging.ERROR, format='X %(message)s'); ")
    assert report.startswith("ERROR 1 X %(message)s <stderr>")
