"""Print the commands of the README's set-up block, one a line, for .ci/run to run as written."""

import sys
from pathlib import Path

HEADING = "## Set up on a fresh machine"


def setup_commands(readme: str) -> list[str]:
    after = readme.split(HEADING, 1)[1]
    block = after.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


if __name__ == "__main__":
    print("\n".join(setup_commands(Path(sys.argv[1]).read_text())))
