"""Parsing labeling configs: the Image tag, its value key, supported controls and their labels."""

import pytest

from labelstudio_backend.labelstudio.label_config import LabelConfigError, parse_label_config

SMART_BRUSH = """
<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Banana" background="#FF0000"/>
    <Label value="Orange" background="#0d14d3"/>
  </BrushLabels>
  <KeyPointLabels name="tag2" toName="image" smart="true">
    <Label value="Banana" smart="true"/>
    <Label value="Orange" smart="true"/>
  </KeyPointLabels>
  <RectangleLabels name="tag3" toName="image" smart="true">
    <Label value="Banana"/>
    <Label value="Orange"/>
  </RectangleLabels>
</View>"""


def test_smart_brush_config():
    config = parse_label_config(SMART_BRUSH)
    assert config.image_name == "image" and config.value_key == "image"
    assert [(c.name, c.type, c.smart) for c in config.controls] == [
        ("tag", "brushlabels", False), ("tag2", "keypointlabels", True), ("tag3", "rectanglelabels", True)]
    assert config.output_labels == ("Banana", "Orange")
    # a keypoint's label is written into the first output control that has it: the brush
    assert config.output_for("Orange").name == "tag"
    assert config.image_url({"id": 1, "data": {"image": "/data/upload/1/a.png"}}) == "/data/upload/1/a.png"


def test_polygon_config_and_other_controls_ignored():
    config = parse_label_config("""
    <View>
      <Header value="Outline the parts"/>
      <Image name="photo" value="$img_url"/>
      <Choices name="quality" toName="photo"><Choice value="good"/></Choices>
      <PolygonLabels name="outline" toName="photo" strokeWidth="3">
        <Label value="wing"/><Label value="tail"/>
      </PolygonLabels>
      <EllipseLabels name="ell" toName="photo"><Label value="eye"/></EllipseLabels>
    </View>""")
    assert config.value_key == "img_url"
    assert [c.type for c in config.controls] == ["polygonlabels", "ellipselabels"]
    assert config.output_labels == ("wing", "tail")  # ellipses are prompts only
    assert config.control("ell").labels == ("eye",)
    with pytest.raises(LabelConfigError, match="'eye' is not in any BrushLabels"):
        config.output_for("eye")


def test_two_images_use_the_one_with_an_output_control():
    config = parse_label_config("""
    <View>
      <Image name="left" value="$a"/>
      <Image name="right" value="$b"/>
      <KeyPointLabels name="kp" toName="left"><Label value="x"/></KeyPointLabels>
      <RectangleLabels name="box" toName="right"><Label value="x"/></RectangleLabels>
    </View>""")
    assert config.image_name == "right" and config.value_key == "b"
    assert [c.name for c in config.controls] == ["box"]


@pytest.mark.parametrize("xml, message", [
    ("", "empty"),
    ("<View><Image name='i' value='$image'>", "not valid XML"),
    ("<View><Text name='t' value='$text'/><Labels name='l' toName='t'><Label value='a'/></Labels></View>",
     "no <Image> tag"),
    ("<View><Image name='i' value='$image'/><Choices name='c' toName='i'><Choice value='a'/></Choices></View>",
     "no BrushLabels, PolygonLabels or RectangleLabels"),
    ("<View><Image name='i' value='$image'/><KeyPointLabels name='k' toName='i'><Label value='a'/>"
     "</KeyPointLabels></View>", "found: keypointlabels"),
    ("<View><Image name='i' value='http://x/a.png'/><BrushLabels name='b' toName='i'><Label value='a'/>"
     "</BrushLabels></View>", "must name a task field"),
])
def test_unusable_configs(xml, message):
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(xml)


def test_task_without_the_image_field():
    config = parse_label_config(SMART_BRUSH)
    with pytest.raises(LabelConfigError, match=r"no image under data\['image'\].*\['photo'\]"):
        config.image_url({"id": 5, "data": {"photo": "x.png"}})
    with pytest.raises(LabelConfigError, match="no 'data'"):
        config.image_url({"id": 5})


def test_errors_are_value_errors():
    assert issubclass(LabelConfigError, ValueError)
