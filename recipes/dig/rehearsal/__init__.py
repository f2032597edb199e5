"""The CPU rehearsal's pieces that are not configuration: tiny Qwen-VL policies built offline from configs
(``tiny_models``) and their warm start on the rehearsal's own data (``warm_start``)."""
