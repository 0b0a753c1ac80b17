from src.utils.resolvers import register as _register_resolvers

_register_resolvers()
