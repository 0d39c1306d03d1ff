"""docs/configs.md is generated from the config files and must match them; every key is documented."""
from conftest import REPO

from biomedlm_jax.training import configdoc


def test_config_reference_is_current_and_complete():
    assert configdoc.undocumented(str(REPO)) == [], "describe new config keys in configdoc.FIELDS"
    current = (REPO / "docs" / "configs.md").read_text(encoding="utf-8")
    assert current == configdoc.render(str(REPO)), "docs/configs.md is stale: python -m biomedlm_jax.configdoc > docs/configs.md"
