from clbench.strategies.hat import HAT, HATHparams

from clbench.path_network import build_path_model
from clbench.path_training import TaskClassifierHparams, memory_after_last_task
from clbench.registry import register


@register
class HATTaskClassifier(HAT):
    """HAT with ccgn's task classifier and episodic memory, for the class setting: all task
    paths run, the classifier picks the task, that task's head answers. Compared with
    ccgn it isolates attention masks versus input-dependent gates."""

    name = "hat_tc"
    settings = ("class",)
    setting_hint = {"task": "with the task label use hat"}

    class Hparams(HATHparams, TaskClassifierHparams):
        pass

    def make_model(self, spec):
        return build_path_model(spec, self.attention_layer(spec), self.hp.classifier_layers)

    def stored_examples(self, scenario):
        return memory_after_last_task(self.hp.memory_size, scenario.train_sizes)
