from amorlip.errors import ConfigError as ConfigError
from amorlip.loss import ContrastiveLoss as ContrastiveLoss
from amorlip.loss import make_loss as make_loss
from amorlip.models import register_tiny_configs as register_tiny_configs

__version__: str
__all__: list[str]
